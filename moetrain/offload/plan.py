"""The memory planner behind ``moetrain plan``: bytes per tier, whether they fit, and the floor of a step.

Per parameter (see the design notes): dense parameters keep fp32 weights, grads and two moments on the
GPU (16 B). Routed experts keep compute weights on the GPU (4 B under bf16-mixed, 2 B for a bf16
model) and, with the grouped GEMM path, a gradient for every expert (same size); their master weights
and moments (12 B) live in the device slots (``gpu_budget_gb``), in host memory up to ``cpu_budget_gb``,
and on NVMe past it. Activations are not
counted (they depend on checkpointing and sequence length).

The floor of an optimizer step is ``max(compute, bytes moved / link)``: the active experts' state goes
up and comes back (24 B/param, both directions at once), compute is ``6 * active params * tokens``
FLOPs at an assumed sustained rate. The expected number of active experts of a layer is
``E * (1 - (1 - 1/E) ** (tokens * k))`` (uniform routing; balanced routers are close to it).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from moetrain.config import ModelConfig
from moetrain.offload.config import OffloadConfig
from moetrain.offload.nvme import align_up
from moetrain.offload.rates import DEFAULT_DUPLEX_GBPS

GiB = 2**30
DEFAULT_COMPUTE_TFLOPS = 400.0
"""Sustained bf16 training throughput assumed for the compute estimate (about 40% of an H100's peak)."""


@dataclass
class Plan:
    """Bytes per tier and the step floor of one model under one offload config.

    Attributes:
        gpu_bytes / host_bytes / nvme_bytes: planned use of each tier.
        gpu_capacity / host_capacity / disk_free: what this machine has (None: unknown here).
        expert_params / dense_params: parameter counts; active_experts: expected per step, all layers.
        moved_bytes: bytes over the link per step; link_gbps: the rate used; compute_s / transfer_s / floor_s.
        breakdown: (tier, what, bytes) lines.
    """

    tier: str
    gpu_bytes: int
    host_bytes: int
    nvme_bytes: int
    gpu_capacity: Optional[int]
    host_capacity: Optional[int]
    disk_free: Optional[int]
    expert_params: int
    dense_params: int
    active_experts: float
    total_experts: int
    moved_bytes: float
    link_gbps: float
    compute_s: float
    transfer_s: float
    breakdown: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def floor_s(self) -> float:
        return max(self.compute_s, self.transfer_s)

    def fits(self) -> dict[str, Optional[bool]]:
        """Per tier: True / False, or None when the capacity is unknown on this machine."""
        def ok(used: int, cap: Optional[int]) -> Optional[bool]:
            return None if cap is None else used <= cap
        return {"gpu": ok(self.gpu_bytes, self.gpu_capacity), "host": ok(self.host_bytes, self.host_capacity),
                "nvme": ok(self.nvme_bytes, self.disk_free) if self.nvme_bytes else True}

    def format(self) -> str:
        """A human-readable report (what ``moetrain plan`` prints)."""
        def gib(n: Optional[float]) -> str:
            return "unknown" if n is None else f"{n / GiB:8.2f} GiB"

        def count(n: int) -> str:
            return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"

        def secs(t: float) -> str:
            return f"{t:.3f} s" if t >= 0.1 else f"{t * 1e3:.3f} ms"

        lines = [f"offload tier: {self.tier}   parameters: {count(self.dense_params)} dense + "
                 f"{count(self.expert_params)} in routed experts", ""]
        lines += [f"  {tier:<5} {what:<52} {gib(n)}" for tier, what, n in self.breakdown]
        lines.append("")
        verdict = self.fits()
        tiers = [("gpu", self.gpu_bytes, self.gpu_capacity), ("host", self.host_bytes, self.host_capacity)]
        if self.nvme_bytes:
            tiers.append(("nvme", self.nvme_bytes, self.disk_free))
        for tier, used, cap in tiers:
            state = {True: "fits", False: "DOES NOT FIT", None: "capacity unknown here"}[verdict[tier]]
            lines.append(f"  {tier:<5} total {gib(used)} of {gib(cap)}: {state}")
        bound = "link" if self.transfer_s > self.compute_s else "compute"
        lines += ["", f"  active experts per step (expected): {self.active_experts:.0f} of {self.total_experts}",
                  f"  link: {self.moved_bytes / GiB:.3f} GiB per step at {self.link_gbps:.0f} GB/s -> "
                  f"{secs(self.transfer_s)};  compute: {secs(self.compute_s)}",
                  f"  floor of a step: {secs(self.floor_s)} ({bound}-bound)"]
        return "\n".join(lines)


def count_parameters(model_config: ModelConfig) -> tuple[int, int, int]:
    """(dense params, routed-expert params, params of one expert).

    From the config's arithmetic (``ModelConfig.param_counts``, checked against transformers in the tests):
    building even a meta-device model runs every initialiser through torch's reference ops, about a minute
    for a 30 B-parameter MoE.
    """
    counts = model_config.param_counts()
    per_expert = 3 * model_config.hidden_size * model_config.moe_intermediate_size
    return counts["dense"], counts["expert"], per_expert


def _machine() -> tuple[Optional[int], Optional[int]]:
    gpu = torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        host = None
    return gpu, host


def make_plan(model_config: ModelConfig, offload_config: OffloadConfig, tokens_per_step: int,
              gpu_capacity: Optional[int] = None, host_capacity: Optional[int] = None,
              disk_free: Optional[int] = None, link_gbps: Optional[float] = None,
              compute_tflops: float = DEFAULT_COMPUTE_TFLOPS, weight_bytes: int = 4) -> Plan:
    """Plan ``model_config`` under ``offload_config`` for ``tokens_per_step`` tokens per optimizer step.

    Capacities default to this machine's (GPU memory, physical host memory, free space at nvme_path);
    ``link_gbps`` defaults to the measured both-directions rate of the GPU machines (93 GB/s).
    ``weight_bytes`` is the size of a resident compute weight and of its gradient: 4 under
    ``bf16-mixed`` (fp32 parameters, bf16 autocast: how ``moetrain fit`` trains on a GPU), 2 for a bf16 model.
    """
    dense, expert, per_expert = count_parameters(model_config)
    n_moe = len(model_config.moe_layers)
    e, k = model_config.num_experts, model_config.num_experts_per_tok
    total_experts = n_moe * e
    gpu_cap, host_cap = _machine()
    gpu_capacity = gpu_capacity if gpu_capacity is not None else gpu_cap
    host_capacity = host_capacity if host_capacity is not None else host_cap
    record = align_up(12 * per_expert)  # one expert's [master | exp_avg | exp_avg_sq], aligned as the store lays it
    state = record * total_experts
    rows: list[tuple[str, str, int]] = [("gpu", "dense weights, grads, AdamW moments (fp32)", 16 * dense)]
    if offload_config.tier == "none":
        rows.append(("gpu", "experts: weights, grads, moments (fp32)", 16 * expert))
        host = nvme = 0
    else:
        slots = max(1, min(int(offload_config.gpu_budget_gb * GiB) // record, total_experts,
                           offload_config.gpu_slots or total_experts))
        rows += [("gpu", f"experts: resident compute weights ({weight_bytes} B/param)", weight_bytes * expert),
                 ("gpu", f"experts: gradients of every expert ({weight_bytes} B/param)", weight_bytes * expert),
                 ("gpu", f"expert state slots ({slots} x {record / 2**20:.1f} MiB)", slots * record)]
        if offload_config.tier == "cpu":
            budget = None if offload_config.cpu_budget_gb is None else int(offload_config.cpu_budget_gb * GiB)
            host = state if budget is None else min(state, budget // record * record)
        else:
            host = 0
        nvme = state - host
        rows.append(("host", "expert master + exp_avg + exp_avg_sq (pinned)", host))
        if nvme:
            rows += [("host", "NVMe staging buffers (pinned)", slots * record),
                     ("nvme", "expert master + exp_avg + exp_avg_sq (swap)", nvme)]
            host += slots * record
    gpu = sum(n for tier, _, n in rows if tier == "gpu")
    if disk_free is None and nvme and offload_config.nvme_path and os.path.isdir(offload_config.nvme_path):
        disk_free = shutil.disk_usage(offload_config.nvme_path).free
    active_per_layer = e * (1.0 - (1.0 - 1.0 / e) ** (tokens_per_step * k))
    active = n_moe * active_per_layer
    moved = 0.0 if offload_config.tier == "none" else 24.0 * per_expert * active
    link = link_gbps if link_gbps is not None else DEFAULT_DUPLEX_GBPS
    active_params_per_token = dense + n_moe * k * per_expert
    compute_s = 6.0 * active_params_per_token * tokens_per_step / (compute_tflops * 1e12)
    return Plan(tier=offload_config.tier, gpu_bytes=gpu, host_bytes=host, nvme_bytes=nvme, gpu_capacity=gpu_capacity,
                host_capacity=host_capacity, disk_free=disk_free, expert_params=expert, dense_params=dense,
                active_experts=active, total_experts=total_experts, moved_bytes=moved, link_gbps=link,
                compute_s=compute_s, transfer_s=moved / (link * 1e9), breakdown=rows)


# ---------------------------------------------------------------------------------------------- moetrain plan
def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {}) or {}
    node[parts[-1]] = value


def plan_from_recipe(recipe: dict[str, Any], **machine: Any) -> Plan:
    """The plan of a recipe (the parsed YAML with overrides applied)."""
    from moetrain.config import ConfigError

    model = recipe.get("model") or {}
    init_from = model.get("init_from")
    if init_from:
        from moetrain.models.hf import load_config
        model_config = load_config(init_from)
    elif model.get("preset"):
        model_config = ModelConfig.from_preset(model["preset"], **(model.get("config") or {}))
    else:
        raise ConfigError("the recipe names no model: set model.preset (or model.init_from)")
    offload = OffloadConfig(**(model.get("offload") or {}))
    data = recipe.get("data") or {}
    tokens = int(data.get("micro_batch_size", 1)) * int(data.get("seq_len", 2048)) * int(
        model.get("accumulate_grad_batches", 1))
    return make_plan(model_config, offload, tokens, **machine)


def _recipe_model_config(recipe: dict[str, Any]) -> ModelConfig:
    model = recipe.get("model") or {}
    if model.get("init_from"):
        from moetrain.models.hf import load_config
        return load_config(model["init_from"])
    return ModelConfig.from_preset(model["preset"], **(model.get("config") or {}))


def main(argv: list[str]) -> int:
    """``moetrain plan --config RECIPE | --preset NAME [--model.offload.tier=cpu ...] [--link_gbps=N]
    [--world_sizes=1,8,64]``: print the one-GPU plan, then the memory per GPU under expert parallelism."""
    import yaml

    from moetrain.offload.plan_parallel import plan_expert_parallel

    config_path, overrides, machine, preset = None, {}, {}, None
    world_sizes: tuple[int, ...] = (1, 8, 64)
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-c", "--config") and args:
            config_path = args.pop(0)
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
        elif arg.startswith("--world_sizes="):
            world_sizes = tuple(int(x) for x in arg.split("=", 1)[1].split(",") if x)
        elif arg.startswith("--link_gbps="):
            machine["link_gbps"] = float(arg.split("=", 1)[1])
        elif arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            overrides[key] = yaml.safe_load(value)
        else:
            print(f"moetrain plan: error: unexpected argument {arg!r}; usage: moetrain plan --config RECIPE "
                  "| --preset=NAME [--section.key=value ...] [--link_gbps=GBPS] [--world_sizes=1,8,64]",
                  file=sys.stderr)
            return 2
    if config_path is None and preset is None:
        print("moetrain plan: error: give the recipe with --config RECIPE (or a model shape with --preset=NAME)",
              file=sys.stderr)
        return 2
    source = config_path or f"preset {preset}"
    try:
        recipe = yaml.safe_load(Path(config_path).read_text()) or {} if config_path else {"model": {"preset": preset}}
        for key, value in overrides.items():
            _set_dotted(recipe, key, value)
        plan = plan_from_recipe(recipe, **machine)
        parallel = plan_expert_parallel(_recipe_model_config(recipe), world_sizes)
    except (OSError, ValueError, TypeError, yaml.YAMLError) as err:
        print(f"moetrain plan: error: {source}: {err}", file=sys.stderr)
        return 2
    print(plan.format())
    print()
    print(parallel)
    return 0
