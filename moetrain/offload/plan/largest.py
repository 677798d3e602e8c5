"""Which preset is the largest that one GPU fully fine-tunes, and with which tier, state formats and gradient
schedule: the search behind ``moetrain plan --largest`` and the ``largest preset`` line of every plan.

A recipe that trains a selection of routed experts (``model.train.routed_experts``: a selection file) asks the
same question for the same share of every preset's routed experts (``expert_share``): only those have state,
gradients, slots and checkpointed moments, so larger presets fit."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from functools import partial
from typing import Optional

from moetrain.config import CONFIGS_DIR, ModelConfig
from moetrain.offload.config import resolve, settings_from_flat
from moetrain.offload.plan.assumptions import GiB
from moetrain.offload.plan.disk import search_storage
from moetrain.offload.plan.memory import make_plan
from moetrain.offload.plan.report import Plan

MASTERS = ("fp32_split", "bf16_kahan", "bf16_sr")
"""Master-weight formats, most exact first (a bf16 master without compensation loses small updates). The exact
master is ``fp32_split``: the bytes of ``fp32``, but with resident compute weights its bf16 half stays on the GPU and
a third less crosses the link (with paged weights it pages whole, as ``fp32``)."""
MOMENTS = ("fp32", "bf16", "int8")
"""Moment formats, most exact first."""


@dataclass(frozen=True)
class Machine:
    """Capacities of one GPU and its host, in bytes (None: unknown)."""

    gpu: Optional[int]
    host: Optional[int]
    disk: Optional[int]

    def describe(self) -> str:
        def gib(n: Optional[int]) -> str:
            return "unknown" if n is None else f"{n / GiB:.0f} GiB"
        return f"GPU {gib(self.gpu)}, host {gib(self.host)}, disk {gib(self.disk)}"


@dataclass(frozen=True)
class FitChoice:
    """One way to place a model's state on a machine, and its plan.

    Attributes:
        tier: ``cpu`` (all expert state in host memory) or ``cpu+nvme`` (host memory, overflow on NVMe).
        master / moments: the state formats. layerwise_grads: needs accumulation 1, no clipping, step_on gpu.
    """

    tier: str
    master: str
    moments: str
    layerwise_grads: bool
    plan: Plan
    paged_weights: bool = False

    def describe(self) -> str:
        where = "host memory" if self.tier == "cpu" else "host memory + NVMe"
        grads = ("; expert gradients freed layer by layer (accumulate_grad_batches 1, max_grad_norm 0, "
                 "step_on gpu)" if self.layerwise_grads else "")
        paged = "; compute weights paged from host memory (resident_weights no)" if self.paged_weights else ""
        return f"expert state in {where}, master {self.master}, moments {self.moments}{grads}{paged}"


def fit_options(model_config: ModelConfig, machine: Machine, micro_batch_tokens: int = 4096, *,
                gpu_budget_gb: float = 1.0, streamed_load: bool = True,
                expert_share: Optional[float] = None, activation_checkpointing: bool = False) -> list[FitChoice]:
    """Every placement the search weighs, in order of preference, each with its plan.

    Preference: compute weights resident on the GPU before paged from host memory (slower: they cross the
    link every micro-batch); gradients of every expert (any accumulation, clipping allowed) before layer-wise
    freeing; then the most exact state (masters outer, moments inner: :data:`MASTERS`, :data:`MOMENTS`); then
    host memory alone before an overflow to NVMe (slower). The overflow's host budget is what the host has
    after everything else it holds at its peak, at load or in training (:data:`.HOST_RESERVE`, the NVMe staging
    buffers, paged weights, a shard being read or saved). ``gpu_budget_gb``: device slots for state being
    stepped (1 GiB, as the DeepSeek-MoE-16B recipe: about ten experts' fp32 state). ``streamed_load``: a
    fine-tune starts from a checkpoint (``init_from``) whose experts' masters stream into the tier, so the
    load peak is fp32 dense + bf16 experts (False: a random initialisation, no download; a large one streams its
    experts' masters as well, a small one builds the fp32 model first). The disk
    holds what such a run needs (:func:`.search_storage`): the downloaded model, the
    swap and one checkpoint. ``expert_share``: the share of the routed experts that train (None: all of them).
    ``activation_checkpointing``: the layers are recomputed in backward (the activations a recipe plans with it).
    """
    out = []
    trained = trained_experts(model_config, expert_share)
    storage = search_storage(model_config, streamed_load)
    for paged, layerwise in itertools.product((False, True), (False, True)):
        for master in MASTERS:
            for moments in MOMENTS:
                base = resolve(settings_from_flat(tier="cpu", master=master, moments=moments,
                                                  gpu_budget_gb=gpu_budget_gb,
                                                  resident_weights="no" if paged else "yes"))
                plan_of = partial(make_plan, model_config, tokens_per_step=micro_batch_tokens,
                                  gpu_capacity=machine.gpu, host_capacity=machine.host, disk_free=machine.disk,
                                  micro_batch_tokens=micro_batch_tokens, layerwise_grads=layerwise,
                                  streamed_load=streamed_load, storage=storage, trained_experts=trained,
                                  activation_checkpointing=activation_checkpointing)
                choices = [("cpu", plan_of(base))]
                if machine.host is not None:
                    # every expert's state on NVMe: what the host holds besides the state, at its higher peak
                    swapped = plan_of(replace(base, cpu_budget_gb=0.0))
                    budget = machine.host - max(swapped.host_bytes, swapped.host_load_bytes)
                    if budget > 0:
                        choices.append(("cpu+nvme", plan_of(replace(base, cpu_budget_gb=budget / GiB))))
                out += [FitChoice(tier, master, moments, layerwise, plan, paged) for tier, plan in choices]
    return out


def trained_experts(model_config: ModelConfig, expert_share: Optional[float]) -> Optional[int]:
    """Routed experts (all layers) that train when ``expert_share`` of them do (None: every one)."""
    if expert_share is None:
        return None
    return round(expert_share * len(model_config.moe_layers) * model_config.num_experts)


def plan_expert_share(plan: Plan) -> Optional[float]:
    """The share of routed experts a recipe's plan trains, for the largest-preset line: None when every one
    does (a selection file not written yet plans full fine-tuning)."""
    if plan.trained_experts is None or not plan.total_experts or plan.trained_experts >= plan.total_experts:
        return None
    return plan.trained_experts / plan.total_experts


def best_fit(model_config: ModelConfig, machine: Machine, *, micro_batch_tokens: int = 4096,
             expert_share: Optional[float] = None, activation_checkpointing: bool = False) -> Optional[FitChoice]:
    """The first placement of :func:`fit_options` under which every tier fits, or None."""
    options = fit_options(model_config, machine, micro_batch_tokens, expert_share=expert_share,
                          activation_checkpointing=activation_checkpointing)
    return next((c for c in options if c.plan.fits_all()), None)


def presets() -> list[ModelConfig]:
    """Every preset under ``configs/models/``, largest first."""
    configs = [ModelConfig.from_preset(p.stem) for p in sorted(CONFIGS_DIR.glob("*.yaml"))]
    return sorted(configs, key=lambda c: -c.param_counts()["total"])


def largest_preset(machine: Machine, micro_batch_tokens: int = 4096, expert_share: Optional[float] = None, *,
                   activation_checkpointing: bool = False) -> list[tuple[ModelConfig, Optional[FitChoice]]]:
    """Each preset, largest first, with the placement under which it fits one GPU of ``machine`` (or None).
    The first entry with a placement is the answer."""
    return [(config, best_fit(config, machine, micro_batch_tokens=micro_batch_tokens, expert_share=expert_share,
                              activation_checkpointing=activation_checkpointing)) for config in presets()]


def _largest_answer(results: list[tuple[ModelConfig, Optional[FitChoice]]]) -> Optional[tuple[ModelConfig, FitChoice]]:
    return next(((c, f) for c, f in results if f is not None), None)


def largest_line(machine: Machine, micro_batch_tokens: int, expert_share: Optional[float] = None, *,
                 activation_checkpointing: bool = False) -> str:
    """One line for the plan printout: the largest preset one GPU of ``machine`` fully fine-tunes, or, with
    ``expert_share`` (a recipe training a selection of routed experts), fine-tunes training that share of its
    routed experts; with the recipe's ``activation_checkpointing``."""
    what = ("fully fine-tunes" if expert_share is None else
            f"fine-tunes training {100 * expert_share:.0f}% of its routed experts, as this recipe does")
    if machine.gpu is None:
        return (f"largest preset one GPU here {what}: GPU capacity unknown here (no CUDA); "
                "ask with --gpu-gb=N --host-gb=N --disk-gb=N")
    answer = _largest_answer(largest_preset(machine, micro_batch_tokens, expert_share,
                                            activation_checkpointing=activation_checkpointing))
    if answer is None:
        return f"largest preset one GPU {what} ({machine.describe()}): none"
    config, choice = answer
    recomputed = ", layers recomputed" if activation_checkpointing else ""
    return (f"largest preset one GPU {what} ({machine.describe()}, {micro_batch_tokens} tokens a "
            f"micro-batch{recomputed}): {config.name} ({config.param_counts()['total'] / 1e9:.1f} B), "
            f"{choice.describe()}")


def format_largest(machine: Machine, micro_batch_tokens: int) -> str:
    """What ``moetrain plan --largest`` prints: every preset's verdict, then the answer's plan."""
    results = largest_preset(machine, micro_batch_tokens)
    lines = [f"Full fine-tuning on one GPU: {machine.describe()}; {micro_batch_tokens} tokens a micro-batch; "
             "starting from a checkpoint (init_from: the experts' masters streamed into the tier); the disk holds "
             "the download (bf16), the swap and one checkpoint.", ""]
    for config, choice in results:
        size = f"{config.param_counts()['total'] / 1e9:7.2f} B"
        if choice is None:
            # the most frugal placements: of the GPU (paged weights, last) and of the host (resident weights)
            options = fit_options(config, machine, micro_batch_tokens)
            frugal = {"resident": [c for c in options if not c.paged_weights][-1].plan, "paged": options[-1].plan}
            short = {k: "+".join(t for t, ok in p.fits().items() if ok is not True) for k, p in frugal.items()}
            lines.append(f"  {config.name:<18} {size}  does not fit (the most compact placement overflows "
                         f"{short['resident']} with resident weights; {short['paged']} with paged weights)")
        else:
            lines.append(f"  {config.name:<18} {size}  fits: {choice.describe()}")
    answer = _largest_answer(results)
    lines.append("")
    if answer is None:
        lines.append("No preset fits one GPU of this machine.")
        return "\n".join(lines)
    config, choice = answer
    lines += [f"Largest: {config.name}, {choice.describe()}.", "", choice.plan.format()]
    return "\n".join(lines)
