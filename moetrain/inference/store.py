"""The routed experts' weights in host memory, one row per (layer, expert), optionally int8.

Row layout (the order of an expert record in the training store): ``gate_proj (I, H) | up_proj (I, H) |
down_proj (H, I)`` flattened, so a row holds P = 3 * I * H values. ``int8`` rows keep one fp32 scale per
output channel beside them: (2I + H,) scales, ``w = q * scale[:, None]`` (symmetric, 127 levels), the
plain weight-only scheme (dequantized on the device just before the expert's matmuls).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Optional

import torch
import torch.nn as nn

_EXPERT_NAME_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_PROJ_INDEX = {"gate_proj": 0, "up_proj": 1, "down_proj": 2}


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of ``weight`` (O, K): returns (q (O, K) int8, scale (O,) fp32)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # (O,) an all-zero row keeps a usable scale
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(O, K) weights of ``dtype`` from int8 ``q`` (O, K) and fp32 ``scale`` (O,)."""
    return (q.float() * scale[:, None]).to(dtype)


class HostExpertStore:
    """Every MoE layer's expert rows in host memory (pinned when the compute device is a GPU).

    Args:
        layers: the MoE layer indices.
        num_experts, hidden_size, intermediate_size: E, H and I (the same in every MoE layer).
        dtype: the compute dtype the rows are served in.
        quantize: store int8 rows with fp32 per-channel scales instead of ``dtype``.
        pin: allocate page-locked memory (asynchronous host-to-device copies).
    """

    def __init__(self, layers: Iterable[int], num_experts: int, hidden_size: int, intermediate_size: int, *,
                 dtype: torch.dtype, quantize: bool = False, pin: bool = False) -> None:
        self.layers = sorted(layers)
        self.num_experts, self.hidden, self.width = num_experts, hidden_size, intermediate_size
        self.dtype = dtype
        self.quantized = quantize
        self.storage_dtype = torch.int8 if quantize else dtype
        ih = intermediate_size * hidden_size
        self.row_numel = 3 * ih
        self.scale_numel = 2 * intermediate_size + hidden_size if quantize else 0
        self.offsets = (0, ih, 2 * ih)  # where gate, up and down start in a row
        self.rows = {layer: torch.empty((num_experts, self.row_numel), dtype=self.storage_dtype, pin_memory=pin)
                     for layer in self.layers}
        self.scales: dict[int, Optional[torch.Tensor]] = {
            layer: torch.empty((num_experts, self.scale_numel), dtype=torch.float32, pin_memory=pin) if quantize
            else None for layer in self.layers}

    @property
    def row_bytes(self) -> int:
        """Bytes one expert moves across the link (its weights and, when int8, its scales)."""
        return self.row_numel * torch.empty((), dtype=self.storage_dtype).element_size() + 4 * self.scale_numel

    @property
    def total_experts(self) -> int:
        return len(self.layers) * self.num_experts

    @property
    def nbytes(self) -> int:
        return self.total_experts * self.row_bytes

    def shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(gate, up, down) weight shapes: (I, H), (I, H), (H, I)."""
        return (self.width, self.hidden), (self.width, self.hidden), (self.hidden, self.width)

    @torch.no_grad()
    def put(self, layer: int, expert: int, proj: int, weight: torch.Tensor) -> None:
        """Store projection ``proj`` (0 gate, 1 up, 2 down) of ``expert`` in ``layer``: ``weight`` (O, K), any
        dtype and device."""
        start = self.offsets[proj]
        shape = self.shapes()[proj]
        if tuple(weight.shape) != shape:
            raise ValueError(f"layer {layer} expert {expert}: projection {proj} has shape {tuple(weight.shape)}, "
                             f"expected {shape}")
        n = shape[0] * shape[1]
        row = self.rows[layer][expert, start:start + n]
        if self.quantized:
            q, scale = quantize_int8(weight.detach().cpu())
            row.copy_(q.reshape(-1))
            scale_start = (0, self.width, 2 * self.width)[proj]
            self.scales[layer][expert, scale_start:scale_start + shape[0]].copy_(scale)
        else:
            row.copy_(weight.detach().reshape(-1))

    def put_named(self, name: str, weight: torch.Tensor) -> None:
        """:meth:`put` by internal parameter name (``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``): the
        ``expert_sink`` of :func:`moetrain.models.hf.load_weights`."""
        m = _EXPERT_NAME_RE.match(name)
        if m is None:
            raise ValueError(f"{name!r} is not a routed expert's weight")
        self.put(int(m.group(1)), int(m.group(2)), _PROJ_INDEX[m.group(3)], weight)

    @classmethod
    def from_blocks(cls, blocks: list[nn.Module], *, dtype: Optional[torch.dtype] = None, quantize: bool = False,
                    pin: bool = False) -> HostExpertStore:
        """A store shaped like ``blocks`` (MoE blocks, ``layer_idx`` and ``experts``), empty.

        Raises:
            ValueError: the MoE layers differ in their expert shape.
        """
        first = blocks[0].experts
        shape = (first.num_experts, first.hidden_size, first.intermediate_size)
        for block in blocks:
            e = block.experts
            if (e.num_experts, e.hidden_size, e.intermediate_size) != shape:
                raise ValueError(f"layer {block.layer_idx}: paged experts need every MoE layer to have the same "
                                 f"expert shape ({shape[0]} experts of {shape[1]}x{shape[2]})")
        if dtype is None:
            dtype = first[0].gate_proj.weight.dtype
        return cls([b.layer_idx for b in blocks], *shape, dtype=dtype, quantize=quantize, pin=pin)

    def fill_from(self, blocks: list[nn.Module]) -> None:
        """Copy resident experts' weights (``block.experts[e].{gate,up,down}_proj.weight``) into the rows."""
        for block in blocks:
            for e, expert in enumerate(block.experts):
                for proj, linear in enumerate((expert.gate_proj, expert.up_proj, expert.down_proj)):
                    self.put(block.layer_idx, e, proj, linear.weight)
