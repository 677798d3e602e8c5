"""From a recipe (the parsed YAML with overrides applied) to what the planner needs: the model's shape, the
tokens and gradient schedule of a step, and the plan itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from moetrain.config import ConfigError, ModelConfig
from moetrain.offload.config import OffloadPlan, OffloadSettings, resolve_section
from moetrain.offload.plan.disk import recipe_storage
from moetrain.offload.plan.memory import make_plan
from moetrain.offload.plan.report import Plan
from moetrain.offload.plan.trained import frozen_dense_groups
from moetrain.offload.schedule import layerwise_grads, steps_under_backward
from moetrain.optim import OptimizerConfig


def recipe_training(recipe: dict[str, Any]) -> dict[str, Any]:
    """What the planner needs from a recipe besides the model: tokens per micro-batch and per step, what trains
    (``model.train``: the routed experts, and the dense groups frozen), whether expert gradients are freed layer by
    layer (:func:`~moetrain.offload.schedule.layerwise_grads`), and whether the model loads by streaming the
    experts' masters into their tier (``init_from`` with tier cpu or nvme)."""
    model = recipe.get("model") or {}
    data = recipe.get("data") or {}
    micro = int(data.get("micro_batch_size", 1)) * int(data.get("seq_len", 2048))
    accumulation = int(model.get("accumulate_grad_batches", 1))
    clip = float((model.get("optimizer") or {}).get("max_grad_norm", OptimizerConfig().max_grad_norm))
    offload = OffloadSettings.from_dict(model.get("offload"))
    # built from the two keys the gradient schedule reads: the others are the training run's to check
    optimizer = OptimizerConfig(max_grad_norm=clip)
    stepping = OffloadPlan(step_on=offload.schedule.step_on)
    trained, source = recipe_selection(recipe)
    return {"tokens_per_step": micro * accumulation, "micro_batch_tokens": micro,
            "trained_experts": trained, "selection_source": source,
            "frozen_groups": frozen_dense_groups(model.get("train")),
            "layerwise_grads": layerwise_grads(optimizer, stepping, accumulate_grad_batches=accumulation),
            "overlapped": steps_under_backward(optimizer, micro_batch=accumulation - 1, micro_batches=accumulation),
            "streamed_load": bool(model.get("init_from")) and offload.placement.tier != "none",
            "from_checkpoint": bool(model.get("init_from")),
            "activation_checkpointing": bool(model.get("activation_checkpointing", False)),
            "residual_bytes": 2 if model.get("residual_dtype", "fp32") == "bf16" else 4}


def recipe_selection(recipe: dict[str, Any]) -> tuple[Optional[int], Optional[str]]:
    """(routed experts that train, all layers; where that comes from) of a recipe's ``model.train.routed_experts``:
    (None, None) for ``all`` (every expert trains), 0 for ``none``, the experts a selection file lists
    (``moetrain select-experts`` writes it). A file not written yet plans full fine-tuning: (None, a phrase that
    says so)."""
    train = (recipe.get("model") or {}).get("train")
    value = train.get("routed_experts", "all") if isinstance(train, dict) else getattr(train, "routed_experts", "all")
    if value in (None, "all"):
        return None, None
    if value == "none":
        return 0, "model.train.routed_experts none"
    if not Path(str(value)).is_file():
        return None, (f"model.train.routed_experts {value} is not here yet: planned as full fine-tuning; "
                      "`moetrain select-experts` writes it")
    from moetrain.models.train_selection import load_expert_selection

    chosen = load_expert_selection(value)
    return sum(len(ids) for ids in chosen.values()), f"model.train.routed_experts {value}"


def plan_from_recipe(recipe: dict[str, Any], **machine: Any) -> Plan:
    """The plan of a recipe (the parsed YAML with overrides applied); ``machine``: make_plan's capacities
    (``disk_free``: see :func:`.recipe_storage`)."""
    offload = resolve_section((recipe.get("model") or {}).get("offload"))
    config = recipe_model(recipe)[0]
    storage, disk_free = recipe_storage(recipe, config, machine.pop("disk_free", None))
    return make_plan(config, offload, **recipe_training(recipe), **machine, disk_free=disk_free, storage=storage)



def recipe_model(recipe: dict[str, Any]) -> tuple[ModelConfig, Optional[str]]:
    """(the model shape a recipe trains, a one-line note or None).

    ``init_from``'s config when the directory is here; when it is not (planning before the download) and the
    recipe also names ``model.preset``, the preset's shape, with a note saying so. The load peak is still the
    one of ``init_from`` (:func:`recipe_training` decides it from the recipe, not from the files).

    Raises:
        ConfigError: no model named, ``init_from`` missing without a preset, or ``model.config`` overrides
            next to ``init_from`` (the checkpoint fixes the shape, as ``moetrain fit`` says too).
    """
    model = recipe.get("model") or {}
    init_from, preset = model.get("init_from"), model.get("preset")
    if init_from and Path(init_from).exists():
        from moetrain.models.hf import load_config, resolve_checkpoint

        if (Path(init_from) / "checkpoints").is_dir():  # a run directory: its newest checkpoint, as fit takes it
            init_from = str(resolve_checkpoint(init_from, init_from))
        return load_config(init_from), None
    if init_from:
        if not preset:
            raise ConfigError(f"model.init_from {init_from} does not exist; download the model there, or name its "
                              "shape with model.preset to plan before the download")
        if model.get("config"):
            raise ConfigError("model.config overrides cannot be combined with model.init_from (the checkpoint fixes "
                              "the shape); remove model.config")
        note = (f"note: model.init_from {init_from} is not here; the shape is preset {preset}'s, loaded as "
                "init_from would load it")
        return ModelConfig.from_preset(preset), note
    if not preset:
        raise ConfigError("the recipe names no model: set model.preset (or model.init_from)")
    return ModelConfig.from_preset(preset, **(model.get("config") or {})), None


