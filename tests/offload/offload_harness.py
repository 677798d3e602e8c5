"""A plain PyTorch training loop (no Lightning) shared by the offload tests: tiny MoE, accumulation,
clipping, warmup-cosine learning rate, weight decay."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Optional

import torch

from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.optim import OptimizerConfig, lr_at

STEPS = 30
ACCUM = 2
OPTIM = OptimizerConfig(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, warmup_steps=5, min_lr_ratio=0.1,
                        max_grad_norm=0.5)


def tiny_model(num_experts: int = 16, seed: int = 0, layers: int = 2) -> MoEForCausalLM:
    """2 MoE layers of ``num_experts`` top-2 experts, hidden 32, with decisive random weights."""
    torch.manual_seed(seed)
    cfg = ModelConfig(family="deepseek_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_experts=num_experts,
                      num_experts_per_tok=2, moe_intermediate_size=16, aux_loss_coef=0.01)
    model = MoEForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.set_expert_impl("loop")
    return model


def batches(steps: int = STEPS, accum: int = ACCUM, tokens: int = 4, seed: int = 1) -> list[torch.Tensor]:
    """(1, tokens) micro-batches: 4 tokens x top-2 per layer leave most experts idle in most steps."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (1, tokens), generator=g) for _ in range(steps * accum)]


def train(model: MoEForCausalLM, optimizer, data: list[torch.Tensor], cfg: OptimizerConfig = OPTIM,
          accum: int = ACCUM, before_step: Optional[Callable[[MoEForCausalLM], None]] = None,
          on_step: Optional[Callable[[int], None]] = None, start: int = 0,
          total: int = STEPS, norms: Optional[list[float]] = None,
          autocast: Optional[torch.dtype] = None) -> MoEForCausalLM:
    """Run ``len(data) // accum`` optimizer steps from step ``start`` of a ``total``-step schedule; ``autocast``:
    the forward passes run under CPU autocast to that dtype."""
    for i in range(len(data) // accum):
        lr = lr_at(cfg, start + i, total)
        for j, ids in enumerate(data[i * accum:(i + 1) * accum]):
            optimizer.begin_micro_batch(j, accum, lr)
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                out = model(ids, labels=ids)
            (out.loss / accum).backward()
        if before_step is not None:
            before_step(model)
        norm = optimizer.clip_grad_norm_(cfg.max_grad_norm)
        if norms is not None:
            norms.append(float(norm))
        optimizer.step(lr)
        optimizer.zero_grad()
        if on_step is not None:
            on_step(start + i)
    return model


def zero_idle_expert_grads(model: MoEForCausalLM) -> None:
    """A dense AdamW's view of idle experts: a zero gradient instead of None."""
    for name, p in model.named_parameters():
        if name in model.expert_parameter_names() and p.grad is None:
            p.grad = torch.zeros_like(p)


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sb = dict(b.named_parameters())
    return max((p.detach() - sb[n].detach()).abs().max().item() for n, p in a.named_parameters())


def clone(model: MoEForCausalLM) -> MoEForCausalLM:
    return copy.deepcopy(model)


def exported(opt) -> dict[str, torch.Tensor]:
    """Every expert's exported master and moments (the checkpoint streams; the engine flushes first)."""
    return dict(opt.named_master_tensors()) | dict(opt.named_optimizer_tensors())


def assert_same_training(a: tuple, b: tuple) -> None:
    """Two (model, optimizer) runs hold the same bits: every parameter, every exported master and moment."""
    (model_a, opt_a), (model_b, opt_b) = a, b
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    ta, tb = exported(opt_a), exported(opt_b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
