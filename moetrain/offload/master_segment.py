"""When the compute weights hold a record's master segment, and copying them into it.

A ``bf16_sr`` record's master is bf16 and a ``fp32_split`` record's master segment is the bf16 half of its exact fp32
master; with resident weights the model's compute weights hold exactly that bf16 after every write, so the segment
need not cross the link (:mod:`moetrain.offload.weight_masters` draws the data flow) and, where nothing steps a record
in host memory, need not be in host memory at all (the store's ``host_skip``). This module holds the rules and the
copy; it imports nothing of the store, which uses them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import torch

from moetrain.offload.state_format import WEIGHT_HELD_BYTES, StateLayout

ENV = "MOETRAIN_MASTER_FROM_WEIGHTS"
"""``MOETRAIN_MASTER_FROM_WEIGHTS=0`` pages whole records (benchmarks compare the two)."""

HOST_ENV = "MOETRAIN_HOST_MASTERS"
"""``MOETRAIN_HOST_MASTERS=1`` keeps a host copy of the master segment even where :func:`host_drops_masters` would
drop it (benchmarks and tests compare the two)."""


class HasMaster(Protocol):
    """What the copy reads of an expert record (:class:`~moetrain.offload.store.ExpertRecord`)."""

    layout: StateLayout
    params: list[torch.nn.Parameter]

    def split(self, part: torch.Tensor) -> list[torch.Tensor]: ...


def masters_from_weights(master: str, resident_weights: str) -> bool:
    """Whether a store of ``master`` records whose compute weights are ``resident_weights`` keeps its master segment
    in the weights: ``bf16_sr`` or ``fp32_split`` (the weights are that stored bf16 itself) and resident weights
    (the parameters hold them), unless the environment turns it off."""
    return master in WEIGHT_HELD_BYTES and resident_weights != "no" and os.environ.get(ENV, "1") != "0"


def host_drops_masters(master: str, resident_weights: str, step_on: str) -> bool:
    """Whether host-tier records hold no master segment at all: the compute weights are the master
    (:func:`masters_from_weights`) and nothing steps a record in host memory (``step_on: gpu``; the CPU share steps
    the master where the record lives). Such a record's slab slice starts after its master (``host_skip`` floats):
    ``bf16_sr`` with int8 moments keeps 2.03 of 4.03 bytes a parameter in host memory, ``fp32_split`` 4 of 6.
    Whatever reads a record's whole state in host memory (checkpoints, state loads, the masters handed back after
    a load into the tiers) takes its master segment from the weights
    (:meth:`~moetrain.offload.store.ExpertStore.whole_state`); records on NVMe stay whole (they move whole)."""
    return masters_from_weights(master, resident_weights) and step_on == "gpu" and os.environ.get(HOST_ENV) != "1"


def master_floats(layout: StateLayout) -> int:
    """Float offset in a record's flat state where what follows the master segment begins (``rest`` or the first
    moment)."""
    at, _, _ = layout.offsets[layout.segments[1][0]]
    assert at % 4 == 0, "segments are 64-byte aligned"
    return at // 4


def copy_masters(recs: Sequence[HasMaster], flats: Sequence[torch.Tensor], *, non_blocking: bool = False) -> None:
    """Copy each record's compute weights into the master segment of its state ``flats`` (each (padded,)), on the
    current stream: a device slot (the page-in's fill) or a host record (a flush; ``non_blocking`` for pinned host
    memory). bf16 to bf16 on CUDA, and exact from fp32 weights too (they hold bf16 values)."""
    dst = [v for rec, flat in zip(recs, flats, strict=True) for v in rec.split(rec.layout.view(flat, "master"))]
    src = [p.detach() for rec in recs for p in rec.params]
    if dst:
        torch._foreach_copy_(dst, src, non_blocking=non_blocking)  # across devices: one copy_ a tensor
