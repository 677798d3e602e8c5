"""The offload engine: expert records in tiers, the swapper, the sparse expert optimizer, NVMe I/O.

Modules, one job each:

* ``config``: the ``model.offload`` recipe section.
* ``store``: one flat ``[master | exp_avg | exp_avg_sq]`` record per routed expert, in a host slab or a swap file.
* ``state_format`` / ``quantize``: a record's byte layout, fp32 or compressed (bf16 master, bf16 or 8-bit moments).
* ``staged_init``: a checkpoint streamed straight into the tiers (no fp32 copy of every expert anywhere).
* ``nvme``: swap files (DeepSpeed async I/O, threaded fallback) and their pre-flight checks.
* ``swapper``: bounded device slots, page-in/page-out streams and events, eviction by routing frequency, and
  the hot-expert state cache.
* ``lookahead``: next-layer routing prediction (precision/recall) and the routing trace for backward prefetch.
* ``cpu_step``: the CPU step path (grads down, DeepSpeed CPU Adam, weights up), pipelined through pinned buffers.
* ``adam``: the AdamW arithmetic (fused on CUDA, torch's loop on the CPU, DeepSpeed CPU Adam).
* ``rates``: link and CPU-Adam rates measured at start-up; the GPU/CPU split of ``step_on: auto``.
* ``optim``: :class:`~moetrain.offload.optim.ExpertOffloadOptimizer`, the sparse expert optimizer.
* ``plan``: ``make_plan`` for ``moetrain plan``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

from moetrain.offload.config import OffloadConfig
from moetrain.optim import DenseAdamW, OptimizerConfig, TrainOptimizer


def build_optimizer(model: nn.Module, optim: OptimizerConfig, offload: OffloadConfig,
                    store: Optional[Any] = None) -> TrainOptimizer:
    """The optimizer for ``model`` under ``offload``: ``tier: none`` is plain AdamW over every parameter;
    ``cpu`` and ``nvme`` page routed experts' state (:class:`~moetrain.offload.optim.ExpertOffloadOptimizer`),
    on ``store`` if one was filled while loading (:func:`~moetrain.offload.staged_init.load_into_tiers`)."""
    if offload.tier == "none":
        return DenseAdamW(model, optim)
    from moetrain.offload.optim import ExpertOffloadOptimizer
    return ExpertOffloadOptimizer(model, optim, offload, store=store)
