"""Optimizer configuration, the learning-rate schedule, and the optimizer interface the training
module drives. ``tier: none`` uses :class:`DenseAdamW` (``torch.optim.AdamW`` over every parameter);
the offload engine provides another implementation of :class:`TrainOptimizer`.

This module sits below ``moetrain.offload``, ``moetrain.training`` and ``moetrain.parallel``, which all
build on it; it imports nothing of moetrain.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

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


def _no_tensors() -> Iterator[tuple[str, torch.Tensor]]:
    return iter(())


@dataclass
class CheckpointState:
    """An optimizer's state as a checkpoint keeps it, by parameter name, taken at an optimizer-step boundary
    (:mod:`moetrain.training.optimizer_state` writes it; ``checkpoint.model_tensors`` takes the masters).

    Attributes:
        dense: the ``torch.optim.Optimizer`` holding the per-parameter state of the parameters it steps (every
            parameter under :class:`DenseAdamW`; the non-expert ones under the offload engine).
        lr_history: the learning rate of every optimizer step taken (the offload engine replays it to catch idle
            experts up); empty when the optimizer keeps none.
        expert_steps: AdamW step count of every parameter whose state the optimizer keeps outside ``dense``
            (offloaded experts); empty when there are none.
        named_master_tensors: streams ``(parameter name, fp32 master weight)`` of those parameters, one record at
            a time; a saved model takes these rather than the model's own (compute-dtype) weights.
        named_optimizer_tensors: streams their moments, ``({name}.exp_avg | {name}.exp_avg_sq, tensor)`` in the
            stored format (8-bit moments followed by their block scales ``{name}.exp_avg.absmax``).
    """

    dense: torch.optim.Optimizer
    lr_history: list[float] = field(default_factory=list)
    expert_steps: dict[str, int] = field(default_factory=dict)
    named_master_tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]] = _no_tensors
    named_optimizer_tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]] = _no_tensors


class SavedOptimizerState(Protocol):
    """An optimizer's state read back from a checkpoint, by parameter name (the files are read on demand, by
    :class:`moetrain.training.optimizer_state.OptimizerFiles`); :meth:`TrainOptimizer.load_checkpoint_state`
    takes what it holds from here.

    Attributes:
        step_index: optimizer steps taken when the state was saved.
        lr_history: the learning rate of each of those steps (zeros where the saving optimizer kept none).
        steps: AdamW step count by parameter name (a parameter without state is absent or has 0).
    """

    step_index: int
    lr_history: list[float]
    steps: dict[str, int]

    def load_into(self, dense: torch.optim.Optimizer) -> None:
        """Fill ``dense``'s per-parameter state, for its own parameters only, from the saved moments."""

    def tensors(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The saved moments of the parameters ``names``, named and stored as
        :attr:`CheckpointState.named_optimizer_tensors` yields them, shape-checked against the model."""


class TrainOptimizer(ABC):
    """What the training module, the checkpoint writers and the callbacks call on an optimizer, whatever the
    tiers behind it. Every optimizer completes it: the methods a training step needs are abstract, and the
    features only some optimizers have are no-ops here, overridden where they apply (callers never ask whether
    an optimizer has a method).

    Implementations: :class:`DenseAdamW` (``tier: none``), the offload engine
    (:class:`~moetrain.offload.composite.CompositeOptimizer`) and the multi-rank wrapper
    (:class:`~moetrain.parallel.optimizer.ParallelOptimizer`).
    """

    # ------------------------------------------------------------------ every optimizer
    @abstractmethod
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm over all parameters (before clipping); scales grads if above max_norm > 0."""

    @abstractmethod
    def step(self, lr: float) -> None:
        """One optimizer step at learning rate ``lr``."""

    @abstractmethod
    def zero_grad(self) -> None:
        """Drop gradients (set to None)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The whole state in memory (what Lightning asks of an optimizer; checkpoints use :meth:`checkpoint_state`)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    @abstractmethod
    def checkpoint_state(self, *, background: bool = False) -> CheckpointState:
        """The state a checkpoint writes, current at this step boundary (deferred work is finished first).

        ``background``: the tensor streams will be read by another thread while this one trains on (an
        asynchronous save); they must then leave alone what training uses.
        """

    @abstractmethod
    def load_checkpoint_state(self, saved: SavedOptimizerState) -> None:
        """Restore the state of every parameter this optimizer steps from ``saved``."""

    # ------------------------------------------------------------------ features some optimizers have
    def begin_micro_batch(self, index: int, count: int, lr: Optional[float] = None) -> None:
        """Called before the forward of micro-batch ``index`` of the ``count`` that make up the coming optimizer
        step, with ``lr`` the learning rate that step will take. The offload engine uses it, on the last
        micro-batch and with ``max_grad_norm == 0``, to step each layer's experts as soon as backward is done with
        that layer (with clipping, every gradient is needed before any update, so it steps in :meth:`step`)."""
        return None  # nothing to do unless an implementation has the feature

    def steps_during_backward(self) -> bool:
        """Whether the backward now running steps parameters as it goes (see :meth:`begin_micro_batch`): their
        state changes before :meth:`step` is called."""
        return False

    def routed(self, layer: int, routing: Any, hidden: torch.Tensor) -> None:
        """The model's routing sink (:class:`~moetrain.models.seam.RoutingSink`, attached by the optimizer that
        uses it): MoE layer ``layer`` routed ``routing.counts`` (E,) tokens from ``hidden`` (T, H)."""
        return None  # nothing to do unless an implementation has the feature

    def add_routed_counts(self, layer: int, counts: torch.Tensor) -> None:
        """Add ``counts`` (E,) tokens to those MoE layer ``layer`` routed in the coming step: the one way counts
        reach an optimizer that steps only the experts that received tokens (its own :meth:`routed` calls it,
        and the multi-rank wrapper adds the other ranks' counts through it)."""
        return None  # nothing to do unless an implementation has the feature

    def telemetry(self) -> dict[str, float]:
        """Figures of the last optimizer step (bytes paged, stall time, cache hits, ...); every key is added to
        that step's line of ``metrics.jsonl``."""
        return {}

    def routing_frequency(self) -> dict[int, list[float]]:
        """MoE layer -> each expert's routing frequency, by which the optimizer chooses what to keep close (a
        checkpoint saves it with the trainer state, so that a resumed run evicts as the first would have)."""
        return {}

    def load_routing_frequency(self, frequency: dict[int, list[float]]) -> None:
        """Restore what :meth:`routing_frequency` returned."""
        return None  # nothing to do unless an implementation has the feature

    def finalize(self) -> None:
        """Finish deferred work (catch-up steps, page-outs still in flight): the model and the state are current."""
        return None  # nothing to do unless an implementation has the feature

    def close(self) -> None:
        """Release what the optimizer holds outside Python's memory (hooks, threads, swap files). Idempotent."""
        return None  # nothing to do unless an implementation has the feature


def global_grad_norm(params: Iterable[torch.Tensor], *, zero_if_none: Collection[int] = ()) -> torch.Tensor:
    """L2 norm over all existing gradients, in fp32, on the device of the first gradient.

    Gradients that are the slices of one stacked tensor, every slice present (the routed experts' per-layer
    stacks, :mod:`moetrain.models.expert_grads`), are normed as that one tensor: one kernel instead of one per
    expert parameter. The norms run as one ``_foreach_norm`` per device, in fp32 without fp32 copies.

    ``zero_if_none``: ids of parameters whose missing gradient counts as a zero one (a dense AdamW's idle experts).
    The norm then equals, in rounding too, the norm of the same gradients with those zeros filled in (a scalar
    zero of the parameter's dtype stands for each: same place in the reduction, same dtypes for ``_foreach_norm``'s
    choice of kernel, same zero norm, nothing of the parameter's size)."""
    zeros: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def zero(p: torch.Tensor) -> torch.Tensor:
        key = (p.device, p.dtype)
        if key not in zeros:
            zeros[key] = torch.zeros((), device=p.device, dtype=p.dtype)
        return zeros[key]

    grads = [p.grad if p.grad is not None else zero(p) for p in params if p.grad is not None or id(p) in zero_if_none]
    if not grads:
        return torch.zeros(())
    tensors = _whole_stacks(grads)
    per_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        per_device.setdefault(t.device, []).append(t)
    device = grads[0].device
    norms = [n.to(device) for ts in per_device.values() for n in torch._foreach_norm(ts, 2.0, dtype=torch.float32)]
    return torch.linalg.vector_norm(torch.stack(norms))


def _whole_stacks(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """``grads`` with each complete set of slices of one stacked tensor (``g._base[i]`` for every i, each once)
    replaced by that tensor, at the place of its first slice; the rest as they are. The order is the gradients'
    own, never that of a set of ids (memory addresses): the norm's reduction, and so its rounding, repeat run to run."""
    slices: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        base = g._base
        if base is not None and base.dim() == g.dim() + 1 and g.shape == base.shape[1:]:
            slices.setdefault(id(base), []).append(g)
    whole = {key for key, gs in slices.items() if len(gs) == gs[0]._base.shape[0]
             and len({g.data_ptr() for g in gs}) == len(gs)}
    out: list[torch.Tensor] = []
    for g in grads:
        key = None if g._base is None else id(g._base)
        if key not in whole:
            out.append(g)
        elif g is slices[key][0]:
            out.append(g._base)
    return out


def clip_(params: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients by max_norm / norm when norm exceeds max_norm (no host sync)."""
    if max_norm <= 0:
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))


class DenseAdamW(TrainOptimizer):
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

    def checkpoint_state(self, *, background: bool = False) -> CheckpointState:
        return CheckpointState(self.opt)

    def load_checkpoint_state(self, saved: SavedOptimizerState) -> None:
        saved.load_into(self.opt)
