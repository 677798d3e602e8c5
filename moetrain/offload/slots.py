"""A device slot of the swapper: what it holds, its state, events and staging buffer; and a step's transfer counters.

:class:`~moetrain.offload.swapper.Swapper` owns a list of :class:`Slot` (the regular pool's first, then the hot-expert
cache's) and mutates them; nothing else does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import torch


class SlotState(enum.Enum):
    """Life of a device slot."""

    EMPTY = "empty"
    READING = "reading"  # NVMe read into the slot's staging buffer in flight; H2D not yet issued
    READY = "ready"  # page-in issued (arrival marked by the slot's in-event) or data already there
    IN_USE = "in_use"  # being stepped


@dataclass
class Slot:
    """One device slot: room for one record's flat ``[master | exp_avg | exp_avg_sq]`` and what it holds.

    Attributes:
        data: (slot_numel,) fp32 on the device.
        hot: the slot belongs to the hot-expert cache (added by :meth:`Swapper.grow_hot_cache`).
        key: (layer, expert) of the record held, None when empty.
        state: see :class:`SlotState`.
        reserved: prefetched for a coming step and not used yet: not evictable.
        dirty: holds a stepped state not yet written back (hot records only).
        master_pending: paged in without its master segment, which :meth:`Swapper.acquire` fills from the
            compute weights (``masters_from_weights``).
        in_event: recorded on the page-in stream after the last copy into the slot (CUDA).
        out_event: recorded on the page-out stream after the last copy out of the slot (CUDA).
        staging: pinned, aligned host buffer of the slot's NVMe reads and writes (None without NVMe records).
    """

    data: torch.Tensor
    hot: bool = False
    key: Optional[tuple[int, int]] = None
    state: SlotState = SlotState.EMPTY
    reserved: bool = False
    dirty: bool = False
    master_pending: bool = False
    in_event: Optional[torch.cuda.Event] = None
    out_event: Optional[torch.cuda.Event] = None
    staging: Optional[torch.Tensor] = None
    written: int = 0  # the write-back batch that last paged the slot out (Swapper.batches)
    views: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # view()'s, by length

    def view(self, numel: int) -> torch.Tensor:
        """The first ``numel`` floats of the slot (one view a length, made once: a step asks for thousands)."""
        out = self.views.get(numel)
        if out is None:
            out = self.views[numel] = self.data[:numel]
        return out


@dataclass
class TransferStats:
    """Counters of one optimizer step (reset by :meth:`Swapper.reset_stats`)."""

    h2d_bytes: int = 0
    d2h_bytes: int = 0
    hits: int = 0
    misses: int = 0
    prefetched: int = 0
    stall_s: float = 0.0  # host time blocked on NVMe reads or on a slot becoming free
    window_start: Optional[torch.cuda.Event] = None  # timing event before the step's first transfer (CUDA)


HOT_STAY = 1.25
"""A hot record keeps its place in the hot-expert cache until another record's routing frequency is this many times
its own. Where every expert is routed every step (DeepSeek-MoE-16B at 131 k tokens a step), the frequencies of a
near-uniform router jitter by some 10% from step to step, and re-ranking them without a margin cooled about 260 of
620 hot records a step, each written back (4.6 GB, a 0.1 s tail of page-outs after the step: run r34's trace) for no
saving: the records that took their places were paged in that step anyway."""


def pick_hot(frequency: dict[tuple[int, int], float], hot: set[tuple[int, int]], capacity: int,
             *, stay: float = HOT_STAY) -> set[tuple[int, int]]:
    """The records (keys of ``frequency``, their routing frequency) the hot-expert cache holds next: the
    ``capacity`` most frequent, the current ``hot`` ones counted ``stay`` times their frequency; a record never
    routed (frequency 0) is not hot."""
    ranked = sorted((k for k, f in frequency.items() if f > 0),
                    key=lambda k: -frequency[k] * (stay if k in hot else 1.0))
    return set(ranked[:capacity])
