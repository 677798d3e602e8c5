"""What the training module asks of the parallel setup: the optimizer, the loss to backpropagate, and
how checkpoints are read and written. With one process every answer is the single-process one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadPlan
from moetrain.optim import OptimizerConfig, TrainOptimizer
from moetrain.parallel.checkpoint import load_optimizer_partitioned, save_checkpoint_distributed
from moetrain.parallel.config import ParallelConfig
from moetrain.parallel.expert_parallel import apply_expert_parallel
from moetrain.parallel.layout import ParallelLayout, build_layout
from moetrain.parallel.loss import loss_for_backward, loss_shares
from moetrain.parallel.optimizer import ParallelOptimizer


class ParallelRuntime:
    """The ``parallel:`` section, live in one process of the run.

    ``active`` once :meth:`build_optimizer` found more than one rank; until then (and in a
    single-process run) every method falls back to the single-process behaviour.
    """

    def __init__(self, config: Optional[ParallelConfig] = None) -> None:
        self.config = config or ParallelConfig()
        self.layout: Optional[ParallelLayout] = None

    @property
    def active(self) -> bool:
        return self.layout is not None

    def build_optimizer(self, model: nn.Module, optim: OptimizerConfig, offload: OffloadPlan) -> TrainOptimizer:
        """Split the model's experts over the expert-parallel group (if any) and build the optimizer."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            if self.config.expert_parallel > 1:
                from moetrain.config import ConfigError

                raise ConfigError(f"parallel.expert_parallel={self.config.expert_parallel} needs that many ranks; "
                                  "set trainer.devices (and trainer.num_nodes) or launch with torchrun")
            return build_optimizer(model, optim, offload)
        self.layout = build_layout(model.config.num_experts, self.config.expert_parallel,
                                   self.config.partition_expert_state)
        if self.layout.ep > 1:
            apply_expert_parallel(model, self.layout.local_experts, self.layout.ep_group)
        return ParallelOptimizer(model, optim, offload, self.layout)

    def loss_for_backward(self, out: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """This rank's share of the global batch's loss (``out.loss`` with one rank)."""
        labels = batch.get("labels")
        if not self.active or labels is None:
            return out.loss
        return loss_for_backward(out, labels)

    def loss_shares(self, out: Any,
                    batch: dict[str, torch.Tensor]) -> Optional[tuple[torch.Tensor, torch.Tensor, float]]:
        """``(ce share, aux share, aux scale)`` of this rank in the global batch (see
        :func:`~moetrain.parallel.loss.loss_shares`; the aux scale is 1 / world, for per-layer aux losses), whose
        sum is the loss to backpropagate; None with one rank (or no labels): the loss is ``out.loss`` itself."""
        labels = batch.get("labels")
        if not self.active or labels is None:
            return None
        ce_share, aux_share = loss_shares(out, labels)
        return ce_share, aux_share, 1.0 / dist.get_world_size()

    def load_optimizer(self, optimizer: Any, model: nn.Module, ckpt_dir: str | Path) -> None:
        if not self.active:
            from moetrain.training.optimizer_state import load_optimizer

            return load_optimizer(optimizer, model, ckpt_dir)
        load_optimizer_partitioned(optimizer, model, ckpt_dir)

    def save_checkpoint(self, run_dir: str | Path, step: int, model: nn.Module, *, optimizer: Any,
                        **kwargs: Any) -> Path:
        """Collective when active (every rank calls it); else :func:`~moetrain.training.checkpoint.save_checkpoint`."""
        if not self.active:
            from moetrain.training.checkpoint import save_checkpoint

            return save_checkpoint(run_dir, step, model, optimizer=optimizer, **kwargs)
        assert self.layout is not None
        return save_checkpoint_distributed(run_dir, step, model, optimizer=optimizer, layout=self.layout, **kwargs)
