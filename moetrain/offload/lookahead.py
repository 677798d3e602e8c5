"""Routing foresight: the next layer's router applied to the current layer's input.

* Look-ahead: when MoE block i routes, its input is scored with block i+1's router (one small
  (T, H) x (H, E) matmul) and keeps the predicted top-k set as an (E,) mask on the device. When block
  i+1 routes, predicted and actual sets are compared on the device (no host sync); the host reads the
  totals once per optimizer step as precision (predicted experts that were used) and recall (used
  experts that were predicted).
* The routing trace (:mod:`moetrain.offload.routing_trace`) is what drives prefetch.

With compute weights resident, what must move before a step is the state of the experts that were
actually used, which the trace gives exactly; so prefetch is driven by the trace, and the look-ahead
is measured (its precision and recall are what paging compute weights per expert would rely on). It is always on
(one small matmul a layer, in the first micro-batch of each optimizer step: that forward is its sample, so the
others launch none of its kernels): no recipe key turns it off.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Lookahead:
    """Predicted-vs-actual accounting for the next MoE layer's experts (device counters).

    Driven by the engine's routing sink (:meth:`observe`, the first micro-batch's forward of each step): no hook of
    its own on the model.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        blocks = model.moe_blocks()
        self.next_block = {blocks[i].layer_idx: blocks[i + 1] for i in range(len(blocks) - 1)}
        self.pending: dict[int, torch.Tensor] = {}
        self.totals = torch.zeros(3, dtype=torch.int64, device=device)  # [hits, predicted, actual]

    @staticmethod
    def _predicted_mask(nxt: nn.Module, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()  # (T, H)
        logits = flat @ nxt.gate.weight.float().t()  # (T, E)
        idx = logits.topk(nxt.gate.top_k, dim=-1).indices.reshape(-1)
        mask = torch.zeros(nxt.gate.num_experts, dtype=torch.bool, device=x.device)
        return mask.index_fill_(0, idx, True)

    @torch.no_grad()
    def observe(self, layer: int, counts: torch.Tensor, hidden: torch.Tensor) -> None:
        """``layer`` routed ``counts`` (E,) from ``hidden`` (T, H): score the prediction made for it, then
        predict the next MoE layer's set from the same input."""
        pred = self.pending.pop(layer, None)
        if pred is not None:
            actual = counts > 0
            self.totals += torch.stack([(pred & actual).sum(), pred.sum(), actual.sum()])
        nxt = self.next_block.get(layer)
        if nxt is not None:
            self.pending[nxt.layer_idx] = self._predicted_mask(nxt, hidden)

    def read(self) -> tuple[float, float]:
        """(precision, recall) since the last read (host read: once per optimizer step)."""
        hits, predicted, actual = self.totals.tolist()
        self.totals.zero_()
        return (hits / predicted if predicted else 0.0, hits / actual if actual else 0.0)
