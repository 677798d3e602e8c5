"""The offloaded optimizer equals torch.optim.AdamW (tier none) parameter for parameter.

30 optimizer steps of a 2-layer, 16-expert top-2 model, accumulation 2, weight decay, global-norm
clipping and warmup-cosine LR; micro-batches of 4 tokens leave most experts idle in most steps.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from offload_harness import OPTIM, batches, clone, max_diff, tiny_model, train, zero_idle_expert_grads

from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig
from moetrain.offload.cpu_step import CpuStepper
from moetrain.offload.optim import build_offload_optimizer
from moetrain.offload.rates import Rates
from moetrain.offload.store import ExpertStore
from moetrain.optim import DenseAdamW


@pytest.fixture(scope="module")
def setup():
    base, data = tiny_model(), batches()
    ref = clone(base)
    train(ref, DenseAdamW(ref, OPTIM), data)
    dense_ref = clone(base)
    train(dense_ref, DenseAdamW(dense_ref, OPTIM), data, before_step=zero_idle_expert_grads)
    assert max_diff(ref, base) > 1e-2, "the reference run must move the weights for the comparison to mean anything"
    assert max_diff(ref, dense_ref) > 1e-4, "skip and dense semantics must differ on this data"
    return base, data, ref, dense_ref


def run(base, data, optim=OPTIM, **offload):
    """Train a copy of ``base`` with the offload engine; returns (model, telemetry of every step)."""
    model = clone(base)
    opt = build_optimizer(model, optim, OffloadConfig(**offload))
    seen: list[dict[str, float]] = []
    train(model, opt, data, cfg=optim, on_step=lambda _: seen.append(opt.telemetry()))
    opt.finalize()
    opt.close()
    return model, seen


@pytest.mark.parametrize("tier,slots", [("cpu", None), ("cpu", 3), ("nvme", 3)])
def test_skip_equals_torch_adamw(setup, tmp_path, tier, slots):
    base, data, ref, _ = setup
    model, seen = run(base, data, tier=tier, nvme_path=str(tmp_path) if tier == "nvme" else None, gpu_slots=slots)
    idle_steps = sum(any(t[f"offload/active_experts/layer{i}"] < 16 for i in (0, 1)) for t in seen)
    assert idle_steps >= len(seen) // 2, "most steps must leave experts idle"
    assert max_diff(model, ref) <= 1e-6
    if tier == "nvme":
        assert sum(t["offload/nvme_read_bytes"] for t in seen) > 0  # state really came back from disk
    if slots is not None:
        assert sum(t["offload/h2d_bytes"] for t in seen) > 0  # 3 slots for 32 experts: paging happened


def test_dense_idle_experts_equal_adamw_with_zero_grads(setup):
    base, data, _, dense_ref = setup
    model, _ = run(base, data, tier="cpu", idle_experts="dense", gpu_slots=4)
    assert max_diff(model, dense_ref) <= 1e-6


@pytest.mark.parametrize("autocast,steps", [(None, 10), (torch.bfloat16, 20)])
def test_dense_idle_experts_with_grouped_gemm(autocast, steps):
    """The grouped GEMM gives idle experts zero slices of each layer's stacked gradient, so the reference's global
    norm reduces every stack as one tensor; the engine's clipping norm must round as that one does (reduced expert
    by expert, its last bit grew to 2e-5 in the weights after 10 steps, 5e-2 after 20 under bf16 autocast)."""
    base, data = tiny_model(), batches(steps=steps)
    base.set_expert_impl("grouped")
    dense_ref = clone(base)
    train(dense_ref, DenseAdamW(dense_ref, OPTIM), data, before_step=zero_idle_expert_grads, total=steps,
          autocast=autocast)
    model = clone(base)
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", idle_experts="dense", gpu_slots=4))
    train(model, opt, data, total=steps, autocast=autocast)
    opt.finalize()
    opt.close()
    assert max_diff(dense_ref, base) > 1e-2
    assert max_diff(model, dense_ref) <= 1e-6


def test_dense_idle_experts_on_nvme(setup, tmp_path):
    base, data, _, dense_ref = setup
    model, _ = run(base, data, tier="nvme", nvme_path=str(tmp_path), idle_experts="dense", gpu_slots=5)
    assert max_diff(model, dense_ref) <= 1e-6


def test_step_on_cpu_agrees(setup):
    base, data, ref, _ = setup
    model, seen = run(base, data, tier="cpu", step_on="cpu")
    assert all(t["offload/experts_stepped_gpu"] == 0 for t in seen)
    assert max_diff(model, ref) <= 1e-5


def test_step_on_auto_uses_both_paths(setup, tmp_path):
    base, data, ref, _ = setup
    offload = OffloadConfig(tier="nvme", nvme_path=str(tmp_path), step_on="auto", gpu_slots=4)
    measured = build_optimizer(clone(base), OPTIM, offload)
    assert measured.telemetry() == {} and measured.rates.measured  # the CPU Adam rate was measured at start-up
    measured.close()
    # rates where one expert's CPU Adam takes as long as one GPU-path expert's paging: the split must use both
    model = clone(base)
    opt = build_offload_optimizer(model, OPTIM, offload,
                                  rates=Rates(h2d_gbps=12.0, d2h_gbps=12.0, cpu_adam_gparams=1.0, measured=True))
    seen: list[dict[str, float]] = []
    train(model, opt, data, on_step=lambda _: seen.append(opt.telemetry()))
    opt.close()
    assert sum(t["offload/experts_stepped_cpu"] for t in seen) > 0
    assert sum(t["offload/experts_stepped_gpu"] for t in seen) > 0
    assert max_diff(model, ref) <= 1e-5


@pytest.mark.parametrize("step_on,slots,tol", [("gpu", 3, 1e-6), ("cpu", None, 1e-5)])
def test_layers_stepped_under_backward_without_clipping(step_on, slots, tol):
    """max_grad_norm 0: each layer's experts are stepped by the backward hook of the last micro-batch
    (accumulation 2), before step() is called; the result is still torch AdamW's."""
    no_clip = dataclasses.replace(OPTIM, max_grad_norm=0.0)
    base, data = tiny_model(), batches(steps=10)
    ref, ref_norms = clone(base), []
    train(ref, DenseAdamW(ref, no_clip), data, cfg=no_clip, total=10, norms=ref_norms)
    assert max_diff(ref, base) > 1e-2
    model, norms, left = clone(base), [], []
    opt = build_optimizer(model, no_clip, OffloadConfig(tier="cpu", step_on=step_on, gpu_slots=slots))
    seen: list[dict[str, float]] = []
    train(model, opt, data, cfg=no_clip, total=10, on_step=lambda _: seen.append(opt.telemetry()), norms=norms,
          before_step=lambda m: left.append(sum(p.grad is not None for n, p in m.named_parameters()
                                                 if n in m.expert_parameter_names())))
    opt.finalize()
    opt.close()
    assert all(t["offload/layers_stepped_in_backward"] == 2 for t in seen)
    assert max_diff(model, ref) <= tol
    # the reported norm counts the gradients of layers already stepped (freed on the GPU path)
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    if step_on == "gpu":
        assert all(n == 0 for n in left)


@pytest.mark.parametrize("max_grad_norm", [0.5, 0.0])
def test_cpu_share_in_a_thread_agrees(max_grad_norm):
    """As on CUDA: the CPU share of each layer runs in a thread beside the GPU share of the next ones
    (and, without clipping, beside backward); step numbers and state must not race."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = dataclasses.replace(OPTIM, max_grad_norm=max_grad_norm)
    base, data = tiny_model(), batches(steps=10)
    ref = clone(base)
    train(ref, DenseAdamW(ref, cfg), data, cfg=cfg, total=10)
    model = clone(base)
    offload = OffloadConfig(tier="cpu", step_on="auto", gpu_slots=4)
    store = ExpertStore(model, offload)
    chunked = []

    class RecordingStepper(CpuStepper):
        def chunks(self, recs):
            chunked.append(super().chunks(recs))
            return chunked[-1]

    # one record per chunk: the two pinned buffer pairs are reused many times per layer
    opt = build_offload_optimizer(model, cfg, offload, store=store, cpu_pool=ThreadPoolExecutor(1),
                                  rates=Rates(h2d_gbps=12.0, d2h_gbps=12.0, cpu_adam_gparams=1.0, measured=True),
                                  cpu_chunk_numel=store.max_padded // 3, cpu_stepper_cls=RecordingStepper)
    seen: list[dict[str, float]] = []
    train(model, opt, data, cfg=cfg, total=10, on_step=lambda _: seen.append(opt.telemetry()))
    assert max(len(c) for c in chunked) > 2 and all(len(chunk) == 1 for c in chunked for chunk in c)
    opt.finalize()
    opt.close()
    assert sum(t["offload/experts_stepped_cpu"] for t in seen) > 0
    assert sum(t["offload/experts_stepped_gpu"] for t in seen) > 0
    assert max_diff(model, ref) <= 1e-5


def test_chunks_of_a_third_step_the_same_bits(monkeypatch):
    """``MOETRAIN_STEP_CHUNKS`` cuts the slots into thirds (the default) or halves: the same records are stepped by
    the same arithmetic, only grouped and paged in another order, so the weights come out bit for bit the same."""
    from moetrain.offload.gpu_step import CHUNKS_ENV

    base, data = tiny_model(), batches(steps=4)
    weights = {}
    for parts in ("2", "3"):
        monkeypatch.setenv(CHUNKS_ENV, parts)
        model = clone(base)
        opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", step_on="gpu", gpu_slots=6))
        train(model, opt, data, total=4)
        opt.finalize()
        opt.close()
        weights[parts] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights["2"], weights["3"], strict=True))
