"""Memory per GPU under expert parallelism: what ``moetrain plan`` reports for 1, 8, 64, ... GPUs.

Rule (16 B/param for Adam in mixed precision: bf16 weights 2 + bf16 grads 2 + fp32 master 4 + two fp32
moments 8):

* dense parameters (embeddings, attention, norms, routers, shared experts, dense MLPs) are replicated on every
  rank with their grads and Adam state: 16 B/param on each GPU;
* the routed experts of each MoE layer are split over the ranks: a rank owns ``ceil(E / world_size)`` experts
  per layer (the busiest rank when E does not divide evenly);
* each rank's experts cost either 16 B/param on its GPU (no offload), or, with moetrain's offload, 2 B compute
  weights + 2 B grads on the GPU and their master weights + moments in that rank's host memory (NVMe past it):
  12 B in fp32, fewer with compressed state (``state_format.state_bytes_per_param``: 4.03 B for bf16 masters
  with int8 moments).

Activations and communication buffers are not counted (they depend on sequence length and checkpointing).

Loading is not the one-GPU streamed path: with ``init_from`` and a tier on several ranks, each rank streams every
expert's master into its own store, then gives them back to its parameters in fp32 and builds the store of its
share (``training/module.py`` ``configure_optimizers``). So each GPU holds at least the whole model in fp32 (4 B/param)
at load, and each rank's host memory every expert's state for a while; the table's note says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moetrain.config import ModelConfig

GiB = 2**30
ADAM_BYTES = 16
"""Bytes per parameter: bf16 weights and grads, fp32 master weights and two fp32 moments."""
GPU_BYTES = 80 * GiB
"""Memory of the GPUs the note compares against (H100 80 GB)."""
LOAD_BYTES = 4
"""Bytes per parameter on each GPU while several ranks load ``init_from``: the fp32 model (see the module notes)."""
STATE_BYTES = 12
"""The part of ADAM_BYTES that offload moves off the GPU: fp32 master weights and the two moments."""


@dataclass(frozen=True)
class ParallelPlan:
    """Bytes per GPU (and per GPU's share of host memory) at one world size.

    Attributes:
        world_size: GPUs (one expert-parallel rank each).
        experts_per_rank: routed experts a rank owns in each MoE layer.
        dense_params / expert_params_per_rank: parameters held by one rank.
        gpu_no_offload: everything of the rank on its GPU.
        gpu_offload / host_offload: the rank's GPU and host bytes with expert state offloaded.
    """

    world_size: int
    experts_per_rank: int
    dense_params: int
    expert_params_per_rank: int
    gpu_no_offload: int
    gpu_offload: int
    host_offload: int


def expert_parallel_plan(model_config: ModelConfig, world_size: int, weight_bytes: int = 2,
                         *, state_bytes: float = STATE_BYTES) -> ParallelPlan:
    """The per-GPU memory of ``model_config`` on ``world_size`` expert-parallel ranks; ``state_bytes``: the
    offloaded master weights and moments per parameter (``state_format.state_bytes_per_param``)."""
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    counts = model_config.param_counts()
    n_moe = len(model_config.moe_layers)
    per_rank = math.ceil(model_config.num_experts / world_size)
    per_expert = counts["expert"] // max(n_moe * model_config.num_experts, 1)
    local = n_moe * per_rank * per_expert
    dense = counts["dense"]
    return ParallelPlan(
        world_size=world_size, experts_per_rank=per_rank, dense_params=dense, expert_params_per_rank=local,
        gpu_no_offload=ADAM_BYTES * (dense + local),
        gpu_offload=ADAM_BYTES * dense + 2 * weight_bytes * local,
        host_offload=round(state_bytes * local),
    )


def plan_expert_parallel(model_config: ModelConfig, world_sizes: tuple[int, ...] = (1, 8, 64),
                         state_bytes: float = STATE_BYTES, *, state_label: str = "fp32") -> str:
    """A table of memory per GPU per tier for each world size (what ``moetrain plan`` prints); the offloaded
    state takes ``state_bytes`` per parameter, in the format ``state_label`` names."""
    counts = model_config.param_counts()
    lines = [f"{model_config.name}: {counts['total'] / 1e9:.1f} B parameters ({counts['dense'] / 1e9:.2f} B dense, "
             f"replicated; {counts['expert'] / 1e9:.1f} B in {model_config.num_experts} routed experts x "
             f"{len(model_config.moe_layers)} layers, split over ranks). Adam mixed precision, 16 B/param; "
             "activations not counted.",
             "",
             f"  {'GPUs':>5} {'experts/rank':>12} {'no offload: GPU':>16} {'offload: GPU':>13} {'offload: host':>14}"]
    for ws in world_sizes:
        p = expert_parallel_plan(model_config, ws, state_bytes=state_bytes)
        lines.append(f"  {ws:>5} {p.experts_per_rank:>12} {p.gpu_no_offload / GiB:>12.1f} GiB "
                     f"{p.gpu_offload / GiB:>9.1f} GiB {p.host_offload / GiB:>10.1f} GiB")
    lines.append("")
    if ADAM_BYTES * counts["dense"] > GPU_BYTES:
        dense_gib = ADAM_BYTES * counts["dense"] / GiB
        lines.append(f"  note: the replicated dense part alone needs {dense_gib:.1f} GiB per GPU, "
                     f"more than an {GPU_BYTES // GiB} GiB GPU: shard its Adam state over the ranks (ZeRO) or split "
                     "the layers (pipeline/tensor parallelism) as well")
    lines.append(f"  load with init_from on several ranks: each GPU holds at least the whole model in fp32 "
                 f"({LOAD_BYTES * counts['total'] / GiB:.1f} GiB) and each rank's store every expert's state "
                 f"({state_bytes * counts['expert'] / GiB:.1f} GiB, host memory or NVMe) before taking its share")
    lines.append("  (per GPU; offload keeps bf16 expert weights and grads on the GPU and their master weights and "
                 f"moments ({state_label}: {state_bytes:.2f} B/param) in host memory or NVMe)")
    return "\n".join(lines)
