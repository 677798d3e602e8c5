"""The offload engine: expert records in tiers, the swapper, the sparse expert optimizer, NVMe I/O.

Modules, one job each:

* ``config``: the ``model.offload`` recipe section.
* ``store``: one flat ``[master | exp_avg | exp_avg_sq]`` record per routed expert, in a host slab or a swap file.
* ``nvme``: swap files (DeepSpeed async I/O, threaded fallback) and their pre-flight checks.
* ``swapper``: bounded device slots, page-in/page-out streams and events, eviction by routing frequency.
* ``lookahead``: next-layer routing prediction (precision/recall) and the routing trace for backward prefetch.
* ``cpu_step``: the CPU step path (grads down, DeepSpeed CPU Adam, weights up), pipelined through pinned buffers.
* ``adam``: the AdamW arithmetic (fused on CUDA, torch's loop on the CPU, DeepSpeed CPU Adam).
* ``rates``: link and CPU-Adam rates measured at start-up; the GPU/CPU split of ``step_on: auto``.
* ``optim``: :class:`~moetrain.offload.optim.ExpertOffloadOptimizer`, the sparse expert optimizer.
* ``plan``: ``make_plan`` for ``moetrain plan``.
"""

from __future__ import annotations

import torch.nn as nn

from moetrain.offload.config import OffloadConfig
from moetrain.training.optim import DenseAdamW, OptimizerConfig, TrainOptimizer


def build_optimizer(model: nn.Module, optim: OptimizerConfig, offload: OffloadConfig) -> TrainOptimizer:
    """The optimizer for ``model`` under ``offload``: ``tier: none`` is plain AdamW over every parameter;
    ``cpu`` and ``nvme`` page routed experts' state (:class:`~moetrain.offload.optim.ExpertOffloadOptimizer`)."""
    if offload.tier == "none":
        return DenseAdamW(model, optim)
    from moetrain.offload.optim import ExpertOffloadOptimizer
    return ExpertOffloadOptimizer(model, optim, offload)
