"""``moetrain validate`` with paged experts: a Lightning callback that pages the module's routed experts.

    moetrain validate --config recipes/tiny.yaml --ckpt_path=runs/tiny \\
        --trainer.callbacks+=moetrain.inference.validation.PagedValidation --trainer.callbacks.cache_policy=lfu \\
        --trainer.callbacks.gpu_memory_gb=20

When validation starts, the model's experts move into host memory and are paged through the device cache
from then on (:func:`~moetrain.inference.paged.install_paged_experts`); the losses equal resident
validation's. At the end the cache's telemetry is printed (hit rate beside the ideal static cache's, bytes
paged per token).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Literal, Optional

import lightning as L

from moetrain.inference.cache import ExpertCache
from moetrain.inference.config import InferenceConfig
from moetrain.inference.paged import install_paged_experts, paged_cache


class PagedValidation(L.Callback):
    """Page the routed experts of the validated model (see :class:`~moetrain.inference.config.InferenceConfig`).

    Args:
        gpu_memory_gb: device memory of the expert cache (default: what is free, less a reserve).
        cache_slots: expert slots, overriding ``gpu_memory_gb``.
        cache_policy: ``lru`` or ``lfu``.
        expert_dtype: ``auto`` or ``int8``.
        prefetch: page in the next layer's likely experts under the current layer's compute.
    """

    def __init__(self, gpu_memory_gb: Optional[float] = None, cache_slots: Optional[int] = None,
                 cache_policy: Literal["lru", "lfu"] = "lru", expert_dtype: Literal["auto", "int8"] = "auto",
                 prefetch: bool = True) -> None:
        self.config = InferenceConfig(expert_weights="paged", gpu_memory_gb=gpu_memory_gb, cache_slots=cache_slots,
                                      cache_policy=cache_policy, expert_dtype=expert_dtype, prefetch=prefetch)
        self.cache: Optional[ExpertCache] = None
        self.tokens = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "validate":
            return
        model = pl_module.model
        self.cache = paged_cache(model) or install_paged_experts(model, self.config,
                                                                 device=trainer.strategy.root_device)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self.tokens += int(batch["input_ids"].numel())

    def report(self) -> dict:
        """The cache's counters over the validation: hit rate, the ideal static cache's, bytes per token."""
        cache = self.cache
        if cache is None:
            return {}
        return {"cache_slots": cache.num_slots, "total_experts": cache.store.total_experts,
                "cache_policy": cache.policy_name, "hit_rate": round(cache.stats.hit_rate, 4),
                "ideal_static_hit_rate": round(cache.ideal_static_hit_rate(), 4),
                "bytes_paged_per_token": cache.stats.bytes_paged / max(self.tokens, 1)}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cache is not None and trainer.is_global_zero:
            print(f"paged experts: {json.dumps(self.report())}", file=sys.stderr)
