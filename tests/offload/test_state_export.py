"""Streaming export/import of expert optimizer state: equal to torch AdamW's state, and an exact resume."""

from __future__ import annotations

import copy

import pytest
import torch
from offload_harness import OPTIM, batches, clone, max_diff, tiny_model, train, zero_idle_expert_grads

from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig
from moetrain.optim import DenseAdamW


@pytest.mark.parametrize("idle", ["skip", "dense"])
def test_exported_state_equals_torch_adamw_state(idle):
    """Skip: torch AdamW with grad None; dense: torch AdamW with zero grads (caught up at export)."""
    base, data = tiny_model(), batches(steps=10)
    ref = clone(base)
    ref_opt = DenseAdamW(ref, OPTIM)
    train(ref, ref_opt, data, total=10, before_step=zero_idle_expert_grads if idle == "dense" else None)
    model = clone(base)
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", gpu_slots=3, idle_experts=idle))
    train(model, opt, data, total=10)
    params = dict(ref.named_parameters())
    ref_state = {n: ref_opt.opt.state.get(p, {}) for n, p in params.items()}
    steps = opt.expert_steps()
    assert set(steps) == model.expert_parameter_names()
    for name, step in steps.items():
        assert step == int(ref_state[name].get("step", 0)), name  # idle in every step: no state, step 0
    moments = dict(opt.named_optimizer_tensors())
    for name in steps:
        for part in ("exp_avg", "exp_avg_sq"):
            expected = ref_state[name].get(part, torch.zeros_like(params[name]))
            assert torch.equal(moments[f"{name}.{part}"], expected), f"{name}.{part}"
    masters = dict(opt.named_master_tensors())
    assert all(torch.equal(masters[n], params[n].detach()) for n in steps)
    if idle == "skip":
        assert min(steps.values()) < 10 and len(set(steps.values())) > 2  # per-expert counts, not the global step
    else:
        assert set(steps.values()) == {10}  # every expert took every (possibly zero-gradient) step
    opt.close()


@pytest.mark.parametrize("tier,idle", [("cpu", "skip"), ("nvme", "dense")])
def test_resume_from_streamed_state_is_exact(tmp_path, tier, idle):
    total = 12  # 6 steps, export, 6 more
    base, data = tiny_model(), batches(steps=total)
    half = total // 2
    cfg = dict(tier=tier, idle_experts=idle, gpu_slots=4)

    def offload(sub: str) -> OffloadConfig:
        path = tmp_path / sub
        path.mkdir()
        return OffloadConfig(**cfg, nvme_path=str(path) if tier == "nvme" else None)

    whole = clone(base)
    opt = build_optimizer(whole, OPTIM, offload("whole"))
    train(whole, opt, data, total=total)
    opt.finalize()
    opt.close()

    first = clone(base)
    opt = build_optimizer(first, OPTIM, offload("first"))
    train(first, opt, data[:half * 2], total=total)
    meta = copy.deepcopy(opt.state_dict(include_expert_tensors=False))
    tensors = list(opt.named_master_tensors()) + list(opt.named_optimizer_tensors())
    dense_weights = {n: p.detach().clone() for n, p in first.named_parameters()
                     if n not in first.expert_parameter_names()}
    opt.close()

    second = tiny_model(seed=123)  # experts start elsewhere: the master tensors must put them back
    second.load_state_dict(dense_weights, strict=False)
    opt = build_optimizer(second, OPTIM, offload("second"))
    opt.load_state_dict(meta)
    opt.load_expert_tensors(tensors)
    train(second, opt, data[half * 2:], start=half, total=total)
    opt.finalize()
    opt.close()
    assert max_diff(second, whole) == 0.0
    assert max_diff(second, base) > 1e-2
