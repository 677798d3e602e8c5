"""The routed experts' compute weights: their dtype, their packing, and where a step's new weights go.

The fp32 master lives in the expert store; what the experts compute with is a copy in ``compute_dtype``
(bf16 on CUDA by default), either the model's own packed parameters (resident) or the rows of an
:class:`~moetrain.offload.weight_pager.ExpertWeightPager` (``resident_weights: no``). Every writer of new
weights (the GPU step, the CPU step, the idle-expert catch-up, a state load) goes through
:class:`WeightWriter`, so the choice between the two homes is made once.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from moetrain.offload.config import OffloadPlan
from moetrain.offload.store import ExpertRecord
from moetrain.offload.weight_pager import ExpertWeightPager

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def compute_dtype(offload: OffloadPlan, device: torch.device) -> torch.dtype:
    """The routed experts' compute-weight dtype under ``offload.compute_dtype``."""
    if offload.compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if offload.compute_dtype == "bf16" else torch.float32


@torch.no_grad()
def cast_experts(model: nn.Module, dtype: torch.dtype) -> None:
    """Give every MoE block's routed experts weights of ``dtype``, packed: per projection one (E, ...)
    tensor whose slices become the parameters' ``.data`` (what ``RoutedExperts.packed_weights`` finds
    without repacking). The old storage is freed once no parameter points into it."""
    for block in model.moe_blocks():
        experts = block.experts
        for name in PROJECTIONS:
            params = [getattr(e, name).weight for e in experts if hasattr(e, name)]  # not other ranks' experts
            packed = torch.empty((len(params), *params[0].shape), dtype=dtype, device=params[0].device)
            for i, p in enumerate(params):
                packed[i].copy_(p.detach())
                p.data = packed[i]
        if hasattr(experts, "packed_weights"):
            assert all(w.dtype == dtype for w in experts.packed_weights())


class WeightWriter:
    """Writes a record's new compute weights to their home: the pager's host rows, else the model's parameters.

    Args:
        pager: the paged compute weights (``resident_weights: no``), None when the parameters hold them.
    """

    def __init__(self, pager: Optional[ExpertWeightPager]) -> None:
        self.pager = pager

    def write(self, rec: ExpertRecord, weights: torch.Tensor, non_blocking: bool = True) -> None:
        """The record's compute weights become ``weights`` ((n,) in record order, any dtype)."""
        self.write_many([(rec, weights)], non_blocking=non_blocking)

    def write_many(self, pairs: list[tuple[ExpertRecord, torch.Tensor]], non_blocking: bool = True) -> None:
        """:meth:`write` of each (record, weights); resident weights take one multi-tensor copy for all of them."""
        if self.pager is not None:
            for rec, weights in pairs:
                self.pager.write(rec.layer, rec.expert, weights)
            return
        dst = [p.data for rec, _ in pairs for p in rec.params]
        src = [w for rec, weights in pairs for w in rec.split(weights)]
        if dst:
            torch._foreach_copy_(dst, src, non_blocking=non_blocking)

    def write_param(self, rec: ExpertRecord, idx: int, weights: torch.Tensor, *, elems: slice) -> None:
        """Parameter ``idx`` of the record takes ``weights[elems]`` (the record's whole (n,) compute weights)."""
        if self.pager is not None:  # this parameter's part of the row
            self.pager.write(rec.layer, rec.expert, weights[elems], start=elems.start)
        else:
            rec.params[idx].data.copy_(weights[elems].view(rec.shapes[idx]))
