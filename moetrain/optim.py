"""Optimizer configuration, the learning-rate schedule, and the optimizer interface the training
module drives. ``tier: none`` uses :class:`DenseAdamW` (``torch.optim.AdamW`` over every parameter);
the offload engine provides another implementation of :class:`TrainOptimizer`.

This module sits below ``moetrain.offload``, ``moetrain.training`` and ``moetrain.parallel``, which all
build on it; it imports nothing of moetrain.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``.

    Attributes:
        lr: peak learning rate.
        betas: Adam betas.
        eps: Adam epsilon.
        weight_decay: decoupled weight decay on matrices (norm weights and biases are not decayed).
        warmup_steps: optimizer steps of linear warmup from 0.
        max_steps: steps of the schedule; None takes ``trainer.max_steps``.
        min_lr_ratio: floor of the cosine as a fraction of ``lr``.
        max_grad_norm: global-norm clipping over all parameters (0 disables it).
    """

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 0
    max_steps: int | None = None
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0


def lr_at(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total_steps``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices only (not to norm weights or biases)."""
    return param.ndim >= 2


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed matrices and undecayed vectors."""
    decay, no_decay = [], []
    for name, p in named:
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TrainOptimizer(Protocol):
    """What the training module needs from an optimizer, whatever the tiers behind it.

    Optional methods, looked up with ``getattr`` by the training code (DenseAdamW has none):

    * ``named_master_tensors() -> Iterator[tuple[str, torch.Tensor]]``: yields ``(internal parameter
      name, fp32 tensor)`` for every parameter whose master copy lives in the optimizer (for example
      offloaded experts whose compute weights are bf16). Checkpoints prefer these tensors over the
      model's own, so a saved model holds the exact master weights.
    * ``telemetry() -> dict[str, float | int]``: counters of the last optimizer step (bytes paged,
      stall time, cache hits, ...); every key is added to that step's line of ``metrics.jsonl``.
    * ``begin_micro_batch(index: int, count: int, lr: float | None = None)``: called before the forward of
      micro-batch ``index`` of the ``count`` that make up the coming optimizer step, with ``lr`` the
      learning rate that step will take. The offload engine uses it, on the last micro-batch and with
      ``max_grad_norm == 0``, to step each layer's experts as soon as backward is done with that layer
      (with clipping, every gradient is needed before any update, so it steps in ``step`` as before).
    """

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm over all parameters (before clipping); scales grads if above max_norm > 0."""

    def step(self, lr: float) -> None:
        """One optimizer step at learning rate ``lr``."""

    def zero_grad(self) -> None:
        """Drop gradients (set to None)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def global_grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all existing gradients, in fp32, on the device of the first gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def clip_(params: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients by max_norm / norm when norm exceeds max_norm (no host sync)."""
    if max_norm <= 0:
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))


class DenseAdamW:
    """``torch.optim.AdamW`` over every parameter: the reference every tier is compared with."""

    def __init__(self, model: nn.Module, cfg: OptimizerConfig) -> None:
        self.cfg = cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        on_cuda = any(p.is_cuda for p in self.params)
        self.opt = torch.optim.AdamW(
            param_groups(model.named_parameters(), cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
            fused=True if on_cuda else None,
        )

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        norm = global_grad_norm(self.params)
        clip_(self.params, norm, max_norm)
        return norm

    def step(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)
