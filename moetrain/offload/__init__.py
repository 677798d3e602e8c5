"""The offload engine: expert records in tiers, the swapper, the sparse expert optimizer, NVMe I/O."""

from __future__ import annotations

import torch.nn as nn

from moetrain.offload.config import OffloadConfig
from moetrain.training.optim import DenseAdamW, OptimizerConfig, TrainOptimizer


def build_optimizer(model: nn.Module, optim: OptimizerConfig, offload: OffloadConfig) -> TrainOptimizer:
    """The optimizer for ``model`` under ``offload``: ``tier: none`` is plain AdamW over every parameter."""
    if offload.tier == "none":
        return DenseAdamW(model, optim)
    from moetrain.offload.optim import ExpertOffloadOptimizer
    return ExpertOffloadOptimizer(model, optim, offload)
