"""The automatic hot-expert cache (``hot_cache_gb: null``) stays inside the process's share of the GPU.

A recipe checked on a larger card with ``torch.cuda.set_per_process_memory_fraction`` (an 80 GB card's claim on
an H200) used to size the cache from the card's total memory and run out of memory at the second step
(benchmarks/README.md, run m3). Run on the GPU machine: ``python -m pytest -q tests/gpu/test_hot_cache_cap_cuda.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "offload"))
from offload_harness import OPTIM, batches, tiny_model  # noqa: E402

from moetrain.offload import build_optimizer  # noqa: E402
from moetrain.offload.config import OffloadConfig  # noqa: E402


def _step(model, opt, ids) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids.cuda(), labels=ids.cuda())
    out.loss.backward()
    opt.clip_grad_norm_(OPTIM.max_grad_norm)
    opt.step(OPTIM.lr)
    opt.zero_grad()


def _hot_slots(cap_gib: float | None) -> tuple[int, int]:
    """(hot slots the auto cache took after one step, records the regular slots leave for it) under a memory
    fraction of the device equal to ``cap_gib`` above what the process had reserved before the step (None: no
    cap)."""
    torch.cuda.empty_cache()
    model = tiny_model(num_experts=16).cuda()
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", hot_cache_gb=None, gpu_slots=2))
    data = batches(steps=2)
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        if cap_gib is not None:
            torch.cuda.set_per_process_memory_fraction(
                (torch.cuda.memory_reserved() + cap_gib * 2**30) / total)
        _step(model, opt, data[0])
        slots = int(opt.telemetry()["offload/hot_cache_slots"])
        room = len(opt.engine.store.records) - opt.engine.swapper.num_slots
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        opt.close()
    return slots, room


def test_auto_hot_cache_respects_the_memory_fraction():
    uncapped, room = _hot_slots(None)
    assert uncapped == room > 0  # a tiny model: every record not in a regular slot fits the card
    capped, _ = _hot_slots(0.5)  # half a GiB beyond what the process had reserved: less than the margin
    assert capped == 0, f"the cache took {capped} slots with no memory left under the process's cap"
