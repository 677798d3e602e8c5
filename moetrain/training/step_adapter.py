"""What the training module hands Lightning and reports per optimizer step: :class:`OptimizerStepAdapter` (the
:class:`~moetrain.optim.TrainOptimizer` as a ``torch.optim.Optimizer``, so ``global_step`` counts optimizer steps)
and :class:`StepStats` (one step's figures, left on the device until a logger reads them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from moetrain.optim import TrainOptimizer


class OptimizerStepAdapter(torch.optim.Optimizer):
    """Presents a :class:`TrainOptimizer` to Lightning as a ``torch.optim.Optimizer``.

    Lightning counts its ``step`` calls (that is ``trainer.global_step``) and runs its precision
    plugin and hooks around them. The parameter groups are the model's trainable parameters so that
    tools reading ``param_groups[i]["lr"]`` see the learning rate; the optimizer state itself lives in
    the wrapped optimizer (``state`` here stays empty).
    """

    def __init__(self, inner: TrainOptimizer, params: list[torch.nn.Parameter]) -> None:
        super().__init__(params, {"lr": 0.0})
        self.inner = inner

    def step(self, closure: Optional[Callable[[], Any]] = None, lr: float = 0.0) -> Any:  # type: ignore[override]
        # Lightning's closure runs its on_before_optimizer_step hooks; the loss was already backpropagated
        result = closure() if closure is not None else None
        for group in self.param_groups:
            group["lr"] = lr
        self.inner.step(lr)
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)


@dataclass
class StepStats:
    """What one optimizer step did (tensors stay on the device until a logger reads them).

    Attributes:
        step: optimizer steps completed, this one included (1-based).
        loss: mean over the step's micro-batches of cross-entropy + aux loss.
        ce_loss: mean cross-entropy.
        aux_loss: mean auxiliary (load-balancing) loss.
        grad_norm: global gradient norm before clipping.
        lr: learning rate used by this step.
        tokens: input tokens in this step (all micro-batches, all ranks).
        total_tokens: input tokens trained on since step 0 of the run, this step included (a resumed run
            continues the count of its checkpoint).
        should_log: whether this step is one of the logged ones (``log_every_n_steps``, and the last).
        layer_aux_loss: (M,) mean auxiliary loss of each of the M MoE layers, or None for a model without any.

    Under several ranks the losses are those of the global batch (the ranks' shares summed) on the logged
    steps (``should_log``); on the others they are this rank's shares, which nothing reads.
    """

    step: int
    loss: torch.Tensor
    ce_loss: torch.Tensor
    aux_loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    tokens: int
    should_log: bool
    layer_aux_loss: Optional[torch.Tensor] = None
    total_tokens: int = 0
