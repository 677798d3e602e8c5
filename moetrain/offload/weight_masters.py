"""The compute weights as the master: with resident weights, the master's bf16 segment never crosses the link.

A ``bf16_sr`` record's master is bf16, and a ``fp32_split`` record's master segment is the bf16 half of its exact
fp32 master (the other half is the ``rest`` segment). After every write the model's compute weights hold exactly
that bf16 (:meth:`~moetrain.offload.state_format.StateCodec.compute_weights`: the store's initial fill, every step
on either path, a state load). The GPU already holds the segment, then, so the swapper pages only what follows it in
a host-tier record (``rest``, moments and their scales: 2 of 4 bytes a parameter for ``bf16_sr`` with int8
moments, 4 of 6 for ``fp32_split``) and fills the slot's master segment from the weights on the device::

    page-in    H2D  record[paged_from:]  → slot[paged_from:]           (in_stream, as before)
               D2D  weights → slot master segment                      (compute stream, in ``acquire``)
    page-out   D2H  slot[paged_from:]   → record[paged_from:]          (out_stream); the host master is stale
    flush      D2H  weights → host master of every stale record        (before anything reads host state)

The host master is stale between a page-out and the next flush (a checkpoint, a state load, the end of fit) or
settle (before the CPU share steps a record in host memory); the weights are the master meanwhile. Records in
the NVMe swap move whole, as their writes go to disk from the staging buffer. Where no CPU share exists
(``step_on: gpu``) a host record has no master segment at all
(:func:`~moetrain.offload.master_segment.host_drops_masters`): nothing is stale, no flush writes one, and
whatever reads a record's whole state takes the master from the weights
(:meth:`~moetrain.offload.store.ExpertStore.whole_state`).

From the second step on (:func:`step_reads_weights`), the fused kernel reads and writes the master in the weights
themselves: the D2D fill and the weights' write after the step go, no slot's master segment is used, and the hot
cache sized after step 1 is grown without one (:meth:`~moetrain.offload.swapper.Swapper.grow_hot_cache`)::

    page-in    H2D  record[paged_from:]  → slot[paged_from:]           (the slot's master segment stays unused)
    step       the kernel: master from the weights, moments from the slot; new master into the weights
    page-out   D2H  slot[paged_from:]   → record[paged_from:]          (every page-out, hot cache's included)

Shapes: a record of ``n`` parameters in ``padded`` floats; ``paged_from`` floats of master segment (``2 n``
bytes, aligned to 64).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from moetrain.offload.master_segment import master_floats

if TYPE_CHECKING:
    from moetrain.offload.store import ExpertRecord

IN_STEP_ENV = "MOETRAIN_MASTER_IN_STEP"
"""``MOETRAIN_MASTER_IN_STEP=0`` keeps filling the slots' master segments after the first step (see
:func:`step_reads_weights`; benchmarks compare the two)."""


def paged_from(rec: ExpertRecord) -> int:
    """Float offset in ``rec``'s flat state where what follows the master segment begins (``rest`` or the first
    moment)."""
    return master_floats(rec.layout)


def step_reads_weights(recs: Sequence[ExpertRecord], *, masters_in_weights: bool, fused: bool, has_nvme: bool,
                       catch_up: bool) -> bool:
    """Whether, from the second step on, the fused kernel may read and write the master in the compute weights
    (``weight_masters``) instead of the slots: then no page-in fills a slot's master from the weights, no step
    writes the weights from the slot, and hot-cache slots hold no master (twice the slots for ``bf16_sr`` with int8
    moments in the same memory). Needs the master in the weights
    (:func:`~moetrain.offload.master_segment.masters_from_weights`), the fused kernel
    running (``fused``: its first call passed) for every record's format, contiguous bf16 weights, no NVMe records
    (they move whole) and no catch-up (``idle_experts: dense`` steps decoded slot state); ``MOETRAIN_MASTER_IN_STEP=0``
    turns it off."""
    from moetrain.offload.fused_step import supports

    return (masters_in_weights and fused and not has_nvme and not catch_up and os.environ.get(IN_STEP_ENV, "1") != "0"
            and all(supports(r.layout) for r in recs)
            and all(p.dtype == torch.bfloat16 and p.is_contiguous() for r in recs for p in r.params))

