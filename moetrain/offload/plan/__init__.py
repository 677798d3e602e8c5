"""The memory planner behind ``moetrain plan``: bytes per tier, whether they fit, and the floor of a step.

One module per question the planner answers::

    memory.py       bytes per tier (GPU, host, disk/NVMe) of one model under one offload config: make_plan
    activations.py  what autograd keeps for backward from one micro-batch
    disk.py         the run's disk (init_from, swap, checkpoints) and the host memory its files cost
    step_time.py    the floor of a step: max(compute, bytes moved / link, bytes swapped / NVMe)
    trained.py      what trains: each dense model.train group's parameters, and the groups a recipe freezes
    report.py       Plan, the answer, and how it prints; the lines that say what does not fit
    largest.py      the largest preset one GPU fully fine-tunes, and how
    recipe.py       from a recipe to the model shape, tokens and gradient schedule the planner needs
    command.py      the ``moetrain plan`` command
    assumptions.py  reserves and rates assumed rather than measured

When the engine steps layers and how many device slots and hot-cache records its state gets are not the
planner's to decide: it asks :mod:`moetrain.offload.schedule`, as the engine does. The expert-parallel table
is :mod:`moetrain.offload.plan_parallel`.
"""

from moetrain.offload.plan.activations import LOSS_CHUNK_TOKENS, activation_bytes, layer_activation_bytes
from moetrain.offload.plan.assumptions import (
    BF16_STREAM_GAIN,
    DEFAULT_COMPUTE_TFLOPS,
    DEFAULT_NVME_GBPS,
    FUSED_KERNEL_GAIN,
    GPU_RESERVE,
    HOST_BOUND_SHARE,
    HOST_RESERVE,
    LARGE_MICRO_GAIN,
    LOAD_BYTES_PER_PARAM,
    GiB,
    sustained_tflops,
)
from moetrain.offload.plan.command import HELP, MACHINE_FLAGS, USAGE, main
from moetrain.offload.plan.disk import (
    CHECKPOINT_DEFAULTS,
    DEFAULT_SHARD_MB,
    HF_SHARD_BYTES,
    SAVE_SHARDS_IN_FLIGHT,
    Storage,
    checkpoint_bytes,
    checkpoints_on_disk,
    recipe_storage,
    search_storage,
)
from moetrain.offload.plan.largest import (
    MASTERS,
    MOMENTS,
    FitChoice,
    Machine,
    best_fit,
    fit_options,
    format_largest,
    largest_line,
    largest_preset,
    presets,
)
from moetrain.offload.plan.memory import (
    auto_hot_cache_bytes,
    count_parameters,
    load_peak_bytes,
    machine_capacity,
    make_plan,
    random_init_in_host_memory,
)
from moetrain.offload.plan.recipe import plan_from_recipe, recipe_model, recipe_training
from moetrain.offload.plan.report import Plan, plan_overflows
from moetrain.offload.plan.step_time import StepTraffic, compute_seconds, step_traffic
from moetrain.offload.plan.trained import DENSE_GROUPS, dense_group_params, frozen_dense_groups

__all__ = [
    "BF16_STREAM_GAIN", "CHECKPOINT_DEFAULTS", "DEFAULT_COMPUTE_TFLOPS", "FUSED_KERNEL_GAIN", "HOST_BOUND_SHARE",
    "LARGE_MICRO_GAIN", "sustained_tflops",
    "DEFAULT_NVME_GBPS", "DEFAULT_SHARD_MB", "DENSE_GROUPS",
    "GPU_RESERVE", "HELP", "HF_SHARD_BYTES", "HOST_RESERVE", "LOAD_BYTES_PER_PARAM", "LOSS_CHUNK_TOKENS",
    "MACHINE_FLAGS", "MASTERS", "MOMENTS", "SAVE_SHARDS_IN_FLIGHT", "USAGE", "FitChoice", "GiB", "Machine", "Plan",
    "StepTraffic", "Storage", "activation_bytes", "auto_hot_cache_bytes", "best_fit", "checkpoint_bytes",
    "checkpoints_on_disk", "compute_seconds", "count_parameters", "dense_group_params", "fit_options", "format_largest",
    "frozen_dense_groups", "largest_line", "largest_preset", "layer_activation_bytes", "load_peak_bytes",
    "machine_capacity", "main", "make_plan", "plan_from_recipe", "plan_overflows", "presets",
    "random_init_in_host_memory", "recipe_model", "recipe_storage", "recipe_training", "search_storage",
    "step_traffic",
]
