"""The offload engine: expert records in tiers, the swapper, the sparse expert optimizer, NVMe I/O.

Modules, one job each:

* ``config``: the ``model.offload`` recipe section (:class:`~moetrain.offload.config.OffloadSettings`) and its one
  ``resolve`` into the flat :class:`~moetrain.offload.config.OffloadPlan` every part reads.
* ``store``: one flat ``[master | exp_avg | exp_avg_sq]`` record per routed expert, in a host slab or a swap file.
* ``state_format`` / ``quantize``: a record's byte layout, fp32 or compressed (bf16 master, bf16 or 8-bit moments).
* ``staged_init``: a checkpoint streamed straight into the tiers (no fp32 copy of every expert anywhere).
* ``nvme``: swap files (DeepSpeed async I/O, threaded fallback) and their pre-flight checks.
* ``swapper``: bounded device slots, page-in/page-out streams and events, eviction by routing frequency, and
  the hot-expert state cache.
* ``streams``: CUDA streams and events that collapse to nothing on a CPU device.
* ``lookahead``: next-layer routing prediction (precision/recall); ``routing_trace``: the routing trace for
  backward prefetch.
* ``weight_pager`` / ``paged_experts``: paged compute weights and the autograd functions that run on them.
* ``engine``: the expert engine, which wires the parts below; ``composite``: it joined with the dense AdamW;
  ``build``: assembles both. ``schedule``: when a layer is stepped, and slot sizing (each rule once).
* ``gpu_step`` / ``cpu_step``: the two step paths; ``catch_up``: idle experts' missed steps; ``telemetry``: the
  step's figures; ``state_io`` / ``host_state``: named tensors out and in, records' host state;
  ``compute_weights``: the compute dtype and where new weights go.
* ``adam``: the AdamW arithmetic (fused on CUDA, torch's loop on the CPU, DeepSpeed CPU Adam); ``adam_cuda_order``:
  the CPU share's AdamW in the fused CUDA kernel's operations (compiled C, ``csrc/``).
* ``fused_step`` / ``fused_step_kernels``: one Triton kernel a record for the GPU step of compressed state (decode,
  AdamW and encode in registers; ``MOETRAIN_FUSED_STEP=0`` turns it off).
* ``rates``: link and CPU-Adam rates measured at start-up; the GPU/CPU split of ``step_on: auto``.
* ``optim``: the names callers import (:func:`~moetrain.offload.build.build_offload_optimizer`).
* ``plan``: ``make_plan`` for ``moetrain plan``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

from moetrain.offload.config import OffloadPlan
from moetrain.optim import DenseAdamW, OptimizerConfig, TrainOptimizer


def build_optimizer(model: nn.Module, optim: OptimizerConfig, offload: OffloadPlan,
                    *, store: Optional[Any] = None) -> TrainOptimizer:
    """The optimizer for ``model`` under ``offload``: ``tier: none`` is plain AdamW over every parameter;
    ``cpu`` and ``nvme`` page routed experts' state (:func:`~moetrain.offload.build.build_offload_optimizer`),
    on ``store`` if one was filled while loading (:func:`~moetrain.offload.staged_init.load_into_tiers`)."""
    if offload.tier == "none":
        return DenseAdamW(model, optim)
    from moetrain.offload.build import build_offload_optimizer
    return build_offload_optimizer(model, optim, offload, store=store)
