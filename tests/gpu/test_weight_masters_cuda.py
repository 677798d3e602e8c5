"""``master: bf16_sr | fp32_split`` on CUDA: paging what follows the master segment (the compute weights hold that
segment) gives the same bits as paging whole records, with the page-ins on their own stream, the masters filled from
the weights on the compute stream and written back at the flush (``moetrain.offload.weight_masters``).

Run on the GPU machine: ``python -m pytest -q tests/gpu/test_weight_masters_cuda.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "offload"))
from offload_harness import OPTIM, batches, clone, tiny_model  # noqa: E402

from moetrain.offload import build_optimizer  # noqa: E402
from moetrain.offload.config import OffloadConfig  # noqa: E402
from moetrain.offload.master_segment import ENV, HOST_ENV  # noqa: E402
from moetrain.optim import lr_at  # noqa: E402

STEPS = 12


def _run(base, data, monkeypatch, *, on: bool, step_on: str, impl: str, master: str, hot_cache_gb=0.0,
         slots: dict | None = None):
    """Train a copy of ``base``; ``slots`` (when given) takes the swapper's (master in the step, hot slots, bytes a
    hot slot)."""
    monkeypatch.setenv(ENV, "1" if on else "0")
    model = clone(base).cuda()
    model.set_expert_impl(impl)
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", master=master, moments="int8", quant_block=16,
                                                      gpu_slots=3, step_on=step_on, hot_cache_gb=hot_cache_gb))
    moved = 0
    for i in range(STEPS):
        for ids in data[2 * i:2 * i + 2]:
            ids = ids.cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(ids, labels=ids)
            (out.loss / 2).backward()
        opt.clip_grad_norm_(OPTIM.max_grad_norm)
        opt.step(lr_at(OPTIM, i, STEPS))
        opt.zero_grad()
        moved += opt.telemetry()["offload/h2d_bytes"]
    exported = dict(opt.named_master_tensors()) | dict(opt.named_optimizer_tensors())  # flushes first
    torch.cuda.synchronize()
    if slots is not None:
        swapper = opt.engine.swapper
        slots.update(in_step=swapper.weight_masters, hot=swapper.hot_capacity, bytes=swapper.hot_slot_bytes())
    opt.close()
    return model, exported, moved


# step_on: gpu only: auto's split follows measured rates, and the CPU path draws other rounding bits
@pytest.mark.parametrize("master", ["bf16_sr", "fp32_split"])
@pytest.mark.parametrize("step_on,impl", [("gpu", "loop"), ("gpu", "auto")])
def test_moments_only_paging_equals_whole_records(monkeypatch, step_on, impl, master):
    base, data = tiny_model(num_experts=16), batches(steps=STEPS, tokens=16)
    whole, whole_tensors, whole_moved = _run(base, data, monkeypatch, on=False, step_on=step_on, impl=impl,
                                             master=master)
    model, tensors, moved = _run(base, data, monkeypatch, on=True, step_on=step_on, impl=impl, master=master)
    for (name, a), b in zip(model.named_parameters(), whole.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert tensors.keys() == whole_tensors.keys()
    for k in tensors:
        assert torch.equal(tensors[k], whole_tensors[k]), k
    assert 0 < moved < (0.7 if master == "bf16_sr" else 0.8) * whole_moved  # fp32_split: the master's low half too


@pytest.mark.parametrize("master", ["bf16_sr", "fp32_split"])
def test_master_in_step_with_a_compact_hot_cache_equals_slot_masters(monkeypatch, master):
    """From the second step the fused kernel reads and writes the master in the compute weights, and the hot cache
    (sized after step 1, every record that has no slot) holds no master: the same bits as the slots keeping their
    masters (``MOETRAIN_MASTER_IN_STEP=0``), in less device memory a hot slot."""
    base, data = tiny_model(num_experts=16), batches(steps=STEPS, tokens=16)
    runs = {}
    for in_step in ("0", "1"):
        monkeypatch.setenv("MOETRAIN_MASTER_IN_STEP", in_step)
        slots: dict = {}
        model, tensors, _ = _run(base, data, monkeypatch, on=True, step_on="gpu", impl="auto", master=master,
                                 hot_cache_gb=None, slots=slots)
        runs[in_step] = (model, tensors, slots)
    (kept, kept_tensors, off), (model, tensors, on) = runs.values()
    assert not off["in_step"] and on["in_step"] and off["hot"] > 0 and on["hot"] == off["hot"]
    assert on["bytes"] < off["bytes"]
    for (name, a), b in zip(model.named_parameters(), kept.parameters(), strict=True):
        assert torch.equal(a, b), name
    for k in tensors:
        assert torch.equal(tensors[k], kept_tensors[k]), k


@pytest.mark.parametrize("master", ["bf16_sr", "fp32_split"])
def test_host_records_without_masters_equal_host_masters_kept(monkeypatch, master):
    """With ``step_on: gpu`` the pinned host records hold no master (``host_drops_masters``): the page-ins, the
    fused step reading the master in the weights, the hot cache's write-backs and the export (masters read from the
    weights) give the same bits as host records that keep a stale master (``MOETRAIN_HOST_MASTERS=1``)."""
    base, data = tiny_model(num_experts=16), batches(steps=STEPS, tokens=16)
    runs = {}
    for keep in ("1", "0"):
        monkeypatch.setenv(HOST_ENV, keep)
        slots: dict = {}
        runs[keep] = _run(base, data, monkeypatch, on=True, step_on="gpu", impl="auto", master=master,
                          hot_cache_gb=None, slots=slots) + (slots,)
    (kept, kept_tensors, _, kept_slots), (model, tensors, _, slots) = runs.values()
    assert slots["in_step"] and kept_slots["in_step"] and slots["hot"] > 0
    for (name, a), b in zip(model.named_parameters(), kept.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert tensors.keys() == kept_tensors.keys()
    for k in tensors:
        assert torch.equal(tensors[k], kept_tensors[k]), k
