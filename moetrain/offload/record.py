"""One routed expert's optimizer state as the store places it: its :class:`Tier` and its :class:`ExpertRecord` (where
its flat state lives, how it splits into the expert's parameters). :mod:`moetrain.offload.store` holds the records."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from moetrain.offload.state_format import StateCodec, StateLayout


class Tier(enum.Enum):
    """Where a record's master weights and moments live between steps."""

    CPU = "cpu"
    NVME = "nvme"


@dataclass
class ExpertRecord:
    """One routed expert's optimizer state.

    Attributes:
        layer: decoder layer index; expert: expert index in the layer.
        prefix: parameter name prefix, e.g. ``model.layers.1.mlp.experts.3``.
        params: the model's compute-weight parameters, in layout order.
        names: their full names (``prefix + ".gate_proj.weight"``, ...).
        numel: n, parameters of the expert; ``padded``: floats of the flat state buffer (>= 3n).
        tier: where the state lives; ``piece``: the host-slab piece of a CPU-tier record; ``offset``: float
            offset in that piece, or byte offset in the swap file.
        step: AdamW steps applied to this expert (torch's per-parameter ``state["step"]``).
        synced_to: optimizer steps reflected in the state (``idle_experts: dense`` catches up to the current one).
        frequency: decayed count of tokens routed to it (the cache's eviction key).
        host_skip: leading floats of the flat state the slab does not hold (0, or the master segment, which the
            compute weights alone hold: :func:`~moetrain.offload.master_segment.host_drops_masters`); ``offset``
            then points at the first float it does hold; ``host_floats``: what it holds.
    """

    layer: int
    expert: int
    prefix: str
    params: list[nn.Parameter]
    names: list[str]
    numel: int
    padded: int
    tier: Tier = Tier.CPU
    offset: int = 0
    piece: int = 0
    step: int = 0
    synced_to: int = 0
    frequency: float = 0.0
    shapes: list[torch.Size] = field(default_factory=list)
    layout: Optional[StateLayout] = None
    codec: Optional[StateCodec] = None
    host_skip: int = 0

    @property
    def host_floats(self) -> int:
        return self.padded - self.host_skip

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.expert)

    @property
    def state_bytes(self) -> int:
        return self.padded * 4

    def parts(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(master, exp_avg, exp_avg_sq), each (n,) fp32: views of the flat state buffer under the fp32
        layout, decoded copies under a compressed one (write them back with ``codec.encode``)."""
        if self.codec is None:
            n = self.numel
            return flat[:n], flat[n:2 * n], flat[2 * n:3 * n]
        return self.codec.decode(flat)

    def split(self, part: torch.Tensor) -> list[torch.Tensor]:
        """Views of an (n,) part shaped like the expert's parameters."""
        out, start = [], 0
        for shape in self.shapes:
            size = shape.numel()
            out.append(part[start:start + size].view(shape))
            start += size
        return out
