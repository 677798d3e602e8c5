"""Compressed expert state and the hot-expert cache on CUDA: the engine (fused AdamW, quantization on
the device, pinned paging) equals torch's fused AdamW whose expert state passes through the same
number format after each step (fp32 compute, so that the comparison is not drowned by bf16 noise);
and a bf16 run with the most compressed format trains (its loss falls like the fp32 state's).

Run on the GPU machine: ``python -m pytest -q tests/gpu/test_compression_cuda.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "offload"))
from offload_harness import OPTIM, batches, clone, max_diff, tiny_model  # noqa: E402
from test_compression import RoundedAdamW  # noqa: E402

from moetrain.offload import build_optimizer  # noqa: E402
from moetrain.offload.config import OffloadConfig  # noqa: E402
from moetrain.optim import DenseAdamW, lr_at  # noqa: E402

STEPS = 12


def _train(model, opt, data, accum: int = 2, bf16: bool = False, nudge: float = 0.0) -> list[float]:
    """``nudge``: every gradient is multiplied by ``1 + nudge`` before clipping (the reference's sensitivity)."""
    losses = []
    for i in range(len(data) // accum):
        for ids in data[i * accum:(i + 1) * accum]:
            ids = ids.cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                out = model(ids, labels=ids)
            (out.loss / accum).backward()
        losses.append(float(out.loss.detach()))
        if nudge:
            torch._foreach_mul_([p.grad for p in model.parameters() if p.grad is not None], 1 + nudge)
        opt.clip_grad_norm_(OPTIM.max_grad_norm)
        opt.step(lr_at(OPTIM, i, STEPS))
        opt.zero_grad()
    opt.finalize()
    torch.cuda.synchronize()
    return losses


def _model():
    model = tiny_model(num_experts=16).cuda()
    model.set_expert_impl("loop")
    return model


@pytest.mark.parametrize("master,moments,hot", [("fp32", "int8", 0.0), ("bf16_sr", "bf16", 0.0),
                                                ("bf16_kahan", "int8", 1e-4), ("fp32", "fp32", 1e-4)])
def test_engine_equals_fused_adamw_with_rounded_state(master, moments, hot, monkeypatch):
    # The reference encodes with the torch quantizer and torch.Generator bits, which the engine's unfused path
    # shares; the fused kernel (its own Philox bits, scales an ulp apart that can move an int8 code) is held to the
    # unfused path in test_fused_step_cuda.py. Here: paging, chunking and the hot cache add nothing to the rounding.
    monkeypatch.setenv("MOETRAIN_FUSED_STEP", "0")
    base, data = _model(), batches(steps=STEPS, tokens=16)
    ref = clone(base)
    _train(ref, RoundedAdamW(ref, OPTIM, master, moments, 64), data)
    model = clone(base)
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", master=master, moments=moments, quant_block=64,
                                                      gpu_slots=4, hot_cache_gb=hot, compute_dtype="fp32"))
    _train(model, opt, data)
    if hot:
        assert opt.swapper.hot_capacity > 0
    opt.close()
    # The reference clips with grad *= coef, the engine's AdamW divides by 1 / coef: an ulp or two a gradient each
    # step, which a quantization boundary turns into a code step of a moment. The bound is what two ulps (2**-22)
    # on every gradient each step do to the reference itself (on the CPU: 1.0e-3 with fp32 + int8, 5.8e-4 with
    # bf16_kahan + int8, 1.2e-5 with fp32 state), doubled; at least 5e-4. Weights are ~0.2 here; a skipped or
    # doubled step would move them by ~1e-2.
    nudged = clone(base)
    _train(nudged, RoundedAdamW(nudged, OPTIM, master, moments, 64), data, nudge=2.0**-22)
    bound = max(5e-4, 2 * max_diff(nudged, ref))
    assert bound < 5e-3
    assert max_diff(model, ref) <= bound, (max_diff(model, ref), bound)


def test_most_compressed_state_trains_in_bf16_like_fp32_state():
    base, data = _model(), batches(steps=STEPS, tokens=16)
    plain = clone(base)
    fp32_losses = _train(plain, DenseAdamW(plain, OPTIM), data, bf16=True)
    model = clone(base)
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", master="bf16_sr", moments="int8", gpu_slots=4))
    losses = _train(model, opt, data, bf16=True)
    opt.close()
    assert sum(fp32_losses[-4:]) < sum(fp32_losses[:4]), "the reference run must learn"
    assert sum(losses[-4:]) < sum(losses[:4])
    assert abs(sum(losses[-4:]) - sum(fp32_losses[-4:])) <= 0.05 * sum(fp32_losses[-4:])
