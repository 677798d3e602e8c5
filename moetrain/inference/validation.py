"""``moetrain validate`` with paged experts: the model section's ``inference`` settings build the model with its
routed experts in host memory (never allocated on the GPU), and :class:`PagedValidation` reports the cache.

    moetrain validate --config recipes/tiny.yaml --ckpt_path=runs/tiny \\
        --model.inference.expert_weights=paged --model.inference.gpu_memory_gb=20 \\
        --model.inference.cache_policy=lfu

The module (:class:`~moetrain.training.module.MoETrainingModule`) builds the paged model
(:func:`build_paged_model`: the dense part on the device, the experts into host memory or left in the shards)
and loads ``--ckpt_path`` into it (:func:`~moetrain.inference.paged.load_paged_weights`); its
``configure_callbacks`` adds :class:`PagedValidation`, which prints the cache's telemetry at the end (hit rate
beside the ideal static cache's, bytes paged per token). The losses equal resident validation's.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from moetrain.config import ConfigError, ModelConfig
from moetrain.inference.cache import ExpertCache
from moetrain.inference.config import InferenceConfig
from moetrain.inference.paged import empty_paged, load_paged, paged_cache
from moetrain.inference.store import ShardExpertStore
from moetrain.models.decoder import MoEForCausalLM


def build_paged_model(preset: str, *, overrides: Optional[dict[str, Any]], init_from: Optional[str],
                      config: InferenceConfig, device: torch.device, offload_tier: str = "none") -> MoEForCausalLM:
    """The model of ``moetrain validate`` with ``model.inference.expert_weights=paged``: fp32 dense weights on
    ``device`` (validation's bf16 autocast computes in bf16 on a GPU), routed experts in host memory (or in the
    shards), their rows in bf16 on a GPU unless ``expert_dtype`` says otherwise.

    Args:
        preset, overrides: the model's shape when ``init_from`` is None; its weights are then uninitialised
            until :func:`~moetrain.inference.paged.load_paged_weights` loads ``--ckpt_path`` into it.
        init_from: a model directory, moetrain checkpoint or run directory to load now.
        config: the paging settings.
        device: the compute device.
        offload_tier: the model section's ``offload.tier`` (offloading is for training: must be ``none``).

    Raises:
        ConfigError: an offload tier, or ``model.config`` overrides with ``init_from``.
    """
    from moetrain.models.hf import resolve_checkpoint

    if offload_tier != "none":
        raise ConfigError(f"model.inference.expert_weights=paged pages the experts for validation; the offload tier "
                          f"{offload_tier!r} is for training: leave model.offload.placement.tier at none")
    if config.expert_dtype == "auto" and device.type == "cuda":
        config = dataclasses.replace(config, expert_dtype="bf16")
    if init_from is None:
        return empty_paged(ModelConfig.from_preset(preset, **(overrides or {})), config, device=device).train()
    if overrides:
        raise ConfigError("model.config overrides cannot be combined with model.init_from (the checkpoint fixes "
                          "the shape); remove model.config")
    if (Path(init_from) / "checkpoints").is_dir():
        init_from = str(resolve_checkpoint(init_from, init_from))
    return load_paged(init_from, config, device=device).train()


class PagedValidation(L.Callback):
    """Print the expert cache's telemetry of a validation of a paged model (the module adds it; it needs a model
    built with ``model.inference.expert_weights=paged``)."""

    def __init__(self) -> None:
        self.cache: Optional[ExpertCache] = None
        self.tokens = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "validate":
            return
        self.cache = paged_cache(pl_module.model)
        if self.cache is None:
            raise ConfigError("PagedValidation reports paged experts: the model's are resident; build it with "
                              "--model.inference.expert_weights=paged")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cache is not None:
            self.cache.reset_stats()
        self.tokens = 0

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self.tokens += int(batch["input_ids"].numel())

    def report(self) -> dict:
        """The cache's counters over the validation: hit rate, the ideal static cache's, bytes per token."""
        cache = self.cache
        if cache is None:
            return {}
        return {"cache_slots": cache.num_slots, "total_experts": cache.store.total_experts,
                "cache_policy": cache.policy_name,
                "expert_source": "shards" if isinstance(cache.store, ShardExpertStore) else "host",
                "hit_rate": round(cache.stats.hit_rate, 4),
                "ideal_static_hit_rate": round(cache.ideal_static_hit_rate(), 4),
                "bytes_paged_per_token": cache.stats.bytes_paged / max(self.tokens, 1)}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cache is not None and trainer.is_global_zero:
            print(f"paged experts: {json.dumps(self.report())}", file=sys.stderr)
