"""A record's flat state in host memory, for the parts that work on the tiers directly (the CPU step path, the
checkpoint streams, state loads): host-tier records are views of the slab; NVMe records are read into a
staging buffer through an I/O channel of their own, so that this may run in a thread beside the swapper."""

from __future__ import annotations

from typing import Optional

import torch

from moetrain.offload.nvme import aligned_empty
from moetrain.offload.store import ExpertRecord, ExpertStore, Tier


class HostState:
    """Reads and writes records' flat ``[master | exp_avg | exp_avg_sq]`` in their tier, one at a time.

    Args:
        store: the expert store whose records are read.
    """

    def __init__(self, store: ExpertStore) -> None:
        self.store = store
        self.staging: Optional[torch.Tensor] = None  # (max_padded,) pinned, aligned: NVMe records pass here
        self.io = None  # this reader's own swap-file channel, opened on first use

    def read(self, rec: ExpertRecord) -> torch.Tensor:
        """The record's flat state in host memory: a view of the slab, or the staging buffer holding an NVMe record
        or a host record whose master is in the compute weights only (assembled by
        :meth:`~moetrain.offload.store.ExpertStore.whole_state`)."""
        if rec.tier is Tier.CPU and not rec.host_skip:
            return self.store.host_view(rec)
        if self.staging is None:
            self.staging = aligned_empty(self.store.max_padded, self.store.pin)
        if rec.tier is Tier.CPU:
            return self.store.whole_state(rec, out=self.staging)
        if self.io is None:
            self.io = self.store.swap.channel()
        buf = self.staging[:rec.padded]
        self.io.submit_read(buf, rec.offset)
        self.io.wait_reads()
        return buf

    def write(self, rec: ExpertRecord, flat: torch.Tensor) -> None:
        """``flat`` (from :meth:`read`, changed in place) back to the record's tier: nothing to do for a slab view;
        an NVMe record is written whole; a host record without its master gets what follows the master back (its
        master reaches the weights through the caller, as a state load's does)."""
        if rec.tier is Tier.NVME:
            self.io.submit_write(flat, rec.offset)
            self.io.wait_writes()
        elif rec.host_skip:
            self.store.host_tail(rec, rec.host_skip).copy_(flat[rec.host_skip:])
