"""The expert store's host pieces pinned by cudaHostRegister (moetrain.offload.pinned): page-locked, copied to and
from the GPU asynchronously and exactly, and not copied into a forked child (the DataLoader workers); the store
pins its pieces this way on CUDA.

Run on the GPU machine: ``python -m pytest -q tests/gpu/test_pinned_register_cuda.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "offload"))
from offload_harness import tiny_model  # noqa: E402

from moetrain.offload.config import OffloadConfig  # noqa: E402
from moetrain.offload.pinned import RegisteredSlab, dontfork_flag  # noqa: E402
from moetrain.offload.store import ExpertStore  # noqa: E402
from moetrain.training.telemetry import proc_gib  # noqa: E402

GiB = 2**30


def _rss_anon() -> int:
    """This process's private (anonymous) resident memory in bytes."""
    return int(proc_gib("/proc/self/status", {"RssAnon": "anon"})["anon"] * GiB)


def test_registered_piece_is_pinned_and_round_trips_through_the_gpu():
    piece = RegisteredSlab(256 << 20)
    assert piece.registered and piece.tensor.is_pinned() and dontfork_flag(piece.tensor.data_ptr())
    src = torch.randn(piece.tensor.numel(), device="cuda")
    piece.tensor.copy_(src, non_blocking=True)
    back = torch.empty_like(src)
    back.copy_(piece.tensor, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(back, src)
    piece.unregister()
    assert not piece.tensor.is_pinned()


def test_a_forked_child_does_not_copy_registered_pieces():
    """The child's own private memory, not the machine's free memory (which other processes move): a child that
    mapped the piece would hold its 4 GiB in RssAnon (copied, as the kernel copies page-pinned memory at fork)."""
    piece = RegisteredSlab(4 * GiB)
    piece.tensor.fill_(1.0)
    parent = _rss_anon()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, str(_rss_anon()).encode())
        os._exit(0)
    os.close(write)
    child = int(os.read(read, 64))
    os.waitpid(pid, 0)
    piece.unregister()
    assert parent > 4 * GiB and child < parent - 3.5 * GiB, \
        f"the child holds {child / GiB:.2f} GiB of private memory, the parent {parent / GiB:.2f} GiB"


def test_the_store_pins_its_pieces_by_registering_them():
    store = ExpertStore(tiny_model(num_experts=8), OffloadConfig(tier="cpu"), pin=True)
    assert store.registered and len(store.registered) == len(store.slabs)
    assert all(s.is_pinned() for s in store.slabs)
    store.close()
    assert not any(p.registered for p in store.registered)
