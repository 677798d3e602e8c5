"""The learning-rate schedule and DenseAdamW against torch's own scheduler, AdamW and clip_grad_norm_."""

from __future__ import annotations

import copy

import pytest
import torch

from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.optim import DenseAdamW, OptimizerConfig, lr_at, param_groups


def torch_schedule(cfg: OptimizerConfig, total: int) -> list[float]:
    """Linear warmup then cosine decay built from torch.optim.lr_scheduler parts."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    parts, milestones = [], []
    if cfg.warmup_steps:
        # factor at step s: 1/W + (1 - 1/W) * s / (W - 1) = (s + 1) / W
        parts.append(torch.optim.lr_scheduler.LinearLR(opt, 1 / cfg.warmup_steps, 1.0,
                                                       total_iters=max(cfg.warmup_steps - 1, 1)))
        milestones.append(cfg.warmup_steps)
    parts.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - cfg.warmup_steps,
                                                            eta_min=cfg.lr * cfg.min_lr_ratio))
    sched = parts[0] if len(parts) == 1 else torch.optim.lr_scheduler.SequentialLR(opt, parts, milestones)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("warmup,total,min_ratio", [(0, 30, 0.1), (5, 40, 0.0), (10, 25, 0.2)])
def test_lr_schedule_matches_torch_schedulers(warmup, total, min_ratio):
    cfg = OptimizerConfig(lr=3e-3, warmup_steps=warmup, min_lr_ratio=min_ratio)
    ours = [lr_at(cfg, s, total) for s in range(total)]
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64),
                               torch.tensor(torch_schedule(cfg, total), dtype=torch.float64), rtol=1e-9, atol=1e-12)
    # past the end the cosine stays at its floor instead of rising again
    assert lr_at(cfg, total + 5, total) == pytest.approx(cfg.lr * min_ratio)


def tiny_model() -> MoEForCausalLM:
    return MoEForCausalLM(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=16))


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05, 100.0])
def test_dense_adamw_with_clipping_equals_torch(max_grad_norm):
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, warmup_steps=2, max_grad_norm=max_grad_norm)
    ours_model = tiny_model()
    ref_model = copy.deepcopy(ours_model)
    ours = DenseAdamW(ours_model, cfg)
    ref = torch.optim.AdamW(param_groups(ref_model.named_parameters(), cfg.weight_decay), lr=cfg.lr,
                            betas=cfg.betas, eps=cfg.eps)
    gen = torch.Generator().manual_seed(0)
    clipped = False
    for step in range(5):
        ids = torch.randint(0, 64, (2, 12), generator=gen)
        lr = lr_at(cfg, step, 5)
        ours_model(ids, labels=ids).loss.backward()
        norm = ours.clip_grad_norm_(cfg.max_grad_norm)
        ours.step(lr)
        ours.zero_grad()
        ref_model(ids, labels=ids).loss.backward()
        if max_grad_norm > 0:
            ref_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_grad_norm)
        else:
            ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref_model.parameters()
                                                             if p.grad is not None]))
        torch.testing.assert_close(norm, ref_norm)
        clipped |= bool(ref_norm > max_grad_norm) and max_grad_norm > 0
        for group in ref.param_groups:
            group["lr"] = lr
        ref.step()
        ref.zero_grad(set_to_none=True)
    for (name, p), q in zip(ours_model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    assert clipped == (max_grad_norm == 0.05)  # the small bound really clips, the large one never does


def test_weight_decay_skips_vectors():
    groups = param_groups(tiny_model().named_parameters(), 0.1)
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim < 2 for p in groups[1]["params"])
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) > 0
