"""One :class:`~moetrain.optim.TrainOptimizer` from two: torch's AdamW over the dense parameters, and the
:class:`~moetrain.offload.engine.ExpertEngine` over the routed experts.

What joins them is what needs both: the global gradient norm (every gradient, dense and expert, counted once;
the dense gradients scaled now, the experts' inside the fused kernel), the order of a step (the host's one read
of the routing counts, the dense step, the experts deepest layer first) and checkpoints (the dense AdamW's
state, the learning-rate history, the experts' step counts and tensor streams).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from moetrain.offload.engine import ExpertEngine
from moetrain.optim import CheckpointState, OptimizerConfig, SavedOptimizerState, TrainOptimizer, global_grad_norm


class CompositeOptimizer(TrainOptimizer):
    """The dense AdamW and the expert engine, stepped as one optimizer.

    Args:
        model: the model both step (its parameters in model order: the order of the global norm's reduction).
        cfg: AdamW hyperparameters.
        dense: ``torch.optim.AdamW`` over the non-expert parameters.
        engine: the expert engine (attached to the model as its routing sink by the builder).
        hooks: handles of the model hooks the builder installed for the engine (removed by :meth:`close`).
    """

    def __init__(self, model: nn.Module, cfg: OptimizerConfig, dense: torch.optim.Optimizer, engine: ExpertEngine,
                 *, hooks: Optional[list] = None) -> None:
        self.model, self.cfg, self.dense, self.engine = model, cfg, dense, engine
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dense_params = [p for group in dense.param_groups for p in group["params"]]
        self.device = engine.device
        self.hooks = hooks or []
        self._closed = False

    # the engine's parts, for callers that inspect them (benchmarks, tests)
    store = property(lambda self: self.engine.store)
    swapper = property(lambda self: self.engine.swapper)
    rates = property(lambda self: self.engine.rates)
    pager = property(lambda self: self.engine.state_io.writer.pager)

    # ------------------------------------------------------------------ what needs both
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global norm over every gradient (no state is paged); dense grads scaled now, experts in-kernel."""
        engine = self.engine
        norm = self._dense_view_norm() if engine.catch_up.enabled else global_grad_norm(self.params)
        if engine.early_sq is not None:  # layers stepped under backward freed (some of) their grads
            norm = torch.sqrt(norm.to(self.device).square() + engine.early_sq)
        engine.clip_coef = engine.grad_scale = None
        if max_norm > 0 and engine.stepped:
            raise ValueError("clip_grad_norm_ with max_norm > 0 after layers were stepped during backward: "
                             "the optimizer config's max_grad_norm must match the one passed here")
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in self.dense_params:
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
            engine.clip_coef = coef
            engine.grad_scale = (1.0 / coef).to(self.device, torch.float32)
        return norm

    def _dense_view_norm(self) -> torch.Tensor:
        """The global norm as a dense AdamW sees it: an idle expert's missing gradient counts as a zero one, and
        the reduction is :func:`global_grad_norm`'s over the reference's gradients, so it rounds as the reference
        does whichever expert path made them (the loop's separate tensors, or the grouped GEMM's stacks, whose zero
        slices for idle experts make them whole and normed as one tensor)."""
        expert_params = {id(p) for rec in self.engine.store for p in rec.params}
        return global_grad_norm(self.params, zero_if_none=expert_params).to(self.device)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.engine.begin_step(lr)
        for group in self.dense.param_groups:
            group["lr"] = lr
        self.dense.step()
        self.engine.step(lr)

    def zero_grad(self) -> None:
        self.dense.zero_grad(set_to_none=True)
        self.engine.zero_grad()

    # ------------------------------------------------------------------ the engine's features
    def begin_micro_batch(self, index: int, count: int, lr: Optional[float] = None) -> None:
        self.engine.begin_micro_batch(index, count, lr)

    def steps_during_backward(self) -> bool:
        return self.engine.early_lr is not None

    def routed(self, layer: int, routing: Any, hidden: torch.Tensor) -> None:
        self.engine.routed(layer, routing, hidden)

    def add_routed_counts(self, layer: int, counts: torch.Tensor) -> None:
        self.engine.add_routed_counts(layer, counts)

    def telemetry(self) -> dict[str, float]:
        return self.engine.telemetry.read()

    def routing_frequency(self) -> dict[int, list[float]]:
        store = self.engine.store  # experts without a record (frozen, or another rank's) read 0
        freq = {layer: [0.0] * store.num_experts[layer] for layer in store.layers}
        for rec in store:
            freq[rec.layer][rec.expert] = float(rec.frequency)
        return freq

    def load_routing_frequency(self, frequency: dict[int, list[float]]) -> None:
        for rec in self.engine.store:
            values = frequency.get(rec.layer)
            if values is not None and rec.expert < len(values):
                rec.frequency = float(values[rec.expert])

    def finalize(self) -> None:
        self.engine.finalize()

    # ------------------------------------------------------------------ state
    def named_master_tensors(self):
        return self.engine.state_io.named_master_tensors()

    def named_optimizer_tensors(self):
        return self.engine.state_io.named_optimizer_tensors()

    def load_expert_tensors(self, named) -> None:
        self.engine.state_io.load(named)

    def expert_steps(self) -> dict[str, int]:
        return self.engine.expert_steps()

    def checkpoint_state(self, *, background: bool = False) -> CheckpointState:
        """The dense AdamW, the learning-rate history and every expert's step count, after :meth:`finalize`; the
        experts' masters and moments stream from the store (``background``: through a reader of its own)."""
        steps = self.engine.expert_steps()  # finalizes first: catch-up applied, page-outs landed
        io = self.engine.state_io.background() if background else self.engine.state_io
        return CheckpointState(self.dense, list(self.engine.lr_history), steps, io.named_master_tensors,
                               io.named_optimizer_tensors)

    def load_checkpoint_state(self, saved: SavedOptimizerState) -> None:
        """The dense AdamW's moments, then the counters (every expert held: its saved step count, 0 without
        state), then the experts' moments in their stored format."""
        saved.load_into(self.dense)
        names = sorted(self.engine.store.by_name)
        self.engine.load_steps({name: saved.steps.get(name, 0) for name in names}, saved.lr_history,
                               saved.step_index)
        self.engine.state_io.load(saved.tensors(names))

    def state_dict(self, include_expert_tensors: bool = True) -> dict[str, Any]:
        """Dense AdamW state and the experts' step counters; with ``include_expert_tensors`` also every expert's
        master weights and moments."""
        state: dict[str, Any] = {"dense": self.dense.state_dict(), "expert_steps": self.engine.expert_steps(),
                                 "lr_history": list(self.engine.lr_history), "step_index": self.engine.step_index}
        if include_expert_tensors:
            state["expert_tensors"] = dict(self.named_master_tensors()) | dict(self.named_optimizer_tensors())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dense.load_state_dict(state["dense"])
        self.engine.load_steps(state["expert_steps"], state["lr_history"], state["step_index"])
        if "expert_tensors" in state:
            self.engine.state_io.load(state["expert_tensors"].items())

    def close(self) -> None:
        """Remove hooks, stop the CPU step thread and delete the swap file. Idempotent: the training module
        closes the optimizer when fit ends and the CLI once more on its way out, error or not; the swap file is
        deleted even when finishing the pending transfers fails (a CUDA error, Ctrl-C)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.model.detach_routing()
            for h in self.hooks:
                h.remove()
            if self.engine.cpu is not None:
                self.engine.cpu.close()
            self.engine.swapper.flush()
        finally:
            self.engine.store.close()
