"""The model a training run starts from, and the expert store filled while it was built.

``model:`` of a recipe says how the model starts::

    init_from: null, preset P      small (< SEEDED_INIT_MIN_PARAMS): MoEForCausalLM(config) in fp32 on the CPU
                                   large, tier none: seeded chunks drawn in fp32 on the GPU (random_init.build_random)
                                   large, with a tier: the same values, the experts' masters streamed into the store
                                   as they are drawn, their compute weights alone on the GPU (staged_init)
    init_from: DIR (HF or moetrain) tier none: the whole model in fp32 onto the GPU (from_pretrained)
                                   with a tier: the experts' masters streamed shard by shard into the store
    inference.expert_weights: paged  (validate) the routed experts in host memory, never on the GPU

The store, when one was filled, goes to the optimizer (:meth:`MoETrainingModule.configure_optimizers`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from moetrain.config import ConfigError, ModelConfig
from moetrain.inference.config import InferenceConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf import from_pretrained, resolve_checkpoint
from moetrain.models.random_init import SEEDED_INIT_MIN_PARAMS, build_random
from moetrain.models.train_selection import TrainSelection
from moetrain.offload.config import OffloadPlan

ANNOUNCE_MIN_PARAMS = 1_000_000_000  # models from this many parameters on print what is built, and how long (stderr)


def build_device() -> torch.device:
    """Where a model is built: this process's GPU when there is one (``LOCAL_RANK``: each rank of a multi-GPU
    run fills its own GPU rather than every rank the first), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = os.environ.get("LOCAL_RANK")
    return torch.device("cuda", int(local) if local is not None else torch.cuda.current_device())


def random_model(config: ModelConfig, offload: Optional[OffloadPlan] = None,
                 train: Optional[TrainSelection] = None) -> tuple[MoEForCausalLM, Optional[Any]]:
    """(a randomly initialised model of ``config``, None or its expert store), the seed drawn from torch's global
    generator (so ``seed_everything`` fixes it, and every rank draws the same).

    Small models (under :data:`SEEDED_INIT_MIN_PARAMS`) are built in fp32 on the CPU as ``MoEForCausalLM(config)``
    builds them. Larger ones skip that one-core pass (about 13 ns a parameter: 3.5 minutes for 16 B) and the
    host copy: built on the meta device, allocated on :func:`build_device`, filled there chunk by seeded chunk; under
    an offload tier (``offload``) the routed experts' masters stream into the store as they are drawn, one tensor at
    a time, with their compute weights alone on the device (:func:`~moetrain.offload.staged_init.random_into_tiers`:
    the values ``build_random`` gives, without the fp32 model on the GPU that a 47 B model does not fit).
    """
    total = config.param_counts()["total"]
    if total < SEEDED_INIT_MIN_PARAMS:
        return MoEForCausalLM(config), None
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    announce = total >= ANNOUNCE_MIN_PARAMS
    if offload is not None and offload.tier != "none":
        from moetrain.offload.staged_init import random_into_tiers

        return random_into_tiers(config, seed, offload, device=build_device(), train=train, announce=announce)
    return build_random(config, seed, device=build_device(), announce=announce), None


def build_model(preset: str, overrides: Optional[dict[str, Any]], init_from: Optional[str], *,
                train: Optional[TrainSelection], offload: OffloadPlan,
                inference: InferenceConfig) -> tuple[MoEForCausalLM, Optional[Any]]:
    """(the model in train mode, the expert store its build filled or None), as the module docstring's table says.

    Args:
        preset: model shape, a name under ``configs/models/`` (or a YAML path); ignored with ``init_from``.
        overrides: ``model.config``, fields of the preset (not with ``init_from``: the checkpoint fixes the shape).
        init_from: a Hugging Face model directory, a moetrain checkpoint or a run directory (its newest checkpoint).
        train: the ``model.train`` selection: frozen experts get no record in a store laid out at the build.
        offload: the resolved ``model.offload`` section; inference: ``model.inference``.

    Raises:
        ConfigError: overrides with ``init_from``; what loading ``init_from`` raises (names the file and tensor).
    """
    if inference.paged:  # validate: the routed experts straight into host memory, never on the GPU
        from moetrain.inference.validation import build_paged_model

        return build_paged_model(preset, overrides=overrides, init_from=init_from, config=inference,
                                 device=build_device(), offload_tier=offload.tier), None
    if init_from is None:
        return random_model(ModelConfig.from_preset(preset, **(overrides or {})), offload, train)
    if overrides:
        raise ConfigError("model.config overrides cannot be combined with model.init_from (the checkpoint fixes "
                          "the shape); remove model.config")
    if (Path(init_from) / "checkpoints").is_dir():  # a run directory: fine-tune its newest checkpoint
        init_from = str(resolve_checkpoint(init_from, init_from))

    # straight onto the GPU when there is one: host memory then holds about one shard at a time, not the model
    device = build_device()
    if offload.tier != "none":
        # the experts' masters go straight into pinned memory or NVMe, their compute weights onto the device
        from moetrain.offload.staged_init import load_into_tiers

        # frozen experts (model.train) get no record in the store: it is laid out after the selection
        return load_into_tiers(init_from, offload, device, train=train)
    return from_pretrained(init_from, device=device).train(), None

