"""Settings of paged inference: where the routed experts' weights live and how the device cache is run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from moetrain.config import ConfigError
from moetrain.inference.policy import (
    CACHE_POLICIES,
    DEFAULT_CACHE_POLICY,
    DEFAULT_PREFETCH_WHEN_BUSY,
    PREFETCH_WHEN_BUSY,
)

ExpertWeights = Literal["resident", "paged"]
CachePolicyName = Literal["lru", "lfu"]
ExpertDType = Literal["auto", "bf16", "int8"]
ExpertSource = Literal["host", "shards"]
PrefetchWhenBusy = Literal["never", "first", "always"]


@dataclass
class InferenceConfig:
    """How a model's routed experts are held for generation and validation.

    Attributes:
        expert_weights: ``resident``: every expert on the compute device (plain inference); ``paged``: the
            experts' weights in host memory (pinned on a GPU host), only the routed ones paged onto the device
            through a cache of expert slots.
        gpu_memory_gb: device memory the expert cache may take (paged only); None: what is free once the dense
            part is on the device, less a reserve for activations and the KV cache (on the CPU: every expert).
        cache_slots: the number of expert slots, overriding ``gpu_memory_gb`` (tests and CPU runs).
        cache_policy: which cached expert makes room: ``lru`` (least recently used) or ``lfu`` (least
            frequently used over the whole run; an expert routed less often than every cached one is computed
            from a staging slot instead of evicting a more frequent one; the default, the faster of the two on
            an H200, see :mod:`moetrain.inference.policy`).
        expert_dtype: ``auto``: the model's dtype (``moetrain validate`` on a GPU: bf16, the dtype its bf16
            autocast computes the experts in); ``bf16``; ``int8``: per-output-channel int8 weights with fp32
            scales, dequantized on the device as each expert runs (about half the bytes of bf16, so about twice
            the experts fit the cache and half the bytes cross the link).
        expert_source: ``host``: every expert's row in (pinned) host memory, read from the shards once at load;
            ``shards``: none held, an expert's tensors are read from the model directory's memory-mapped
            safetensors shards when the cache misses it (a model larger than host memory; the OS page cache
            keeps what fits).
        prefetch: page in the next MoE layer's top-k likely experts (its router applied to the current layer's
            input) while the current layer computes, into slots whose experts are worth less than the guess (see
            :mod:`moetrain.inference.cache`).
        prefetch_when_busy: which guesses are copied while the link still carries the current layer's misses:
            ``never``, ``first`` (the likeliest one only; the default) or ``always`` (every guess). See
            :mod:`moetrain.inference.policy` for the measurements and the predictions behind the default.
    """

    expert_weights: ExpertWeights = "resident"
    gpu_memory_gb: Optional[float] = None
    cache_slots: Optional[int] = None
    cache_policy: CachePolicyName = DEFAULT_CACHE_POLICY  # type: ignore[assignment]
    expert_dtype: ExpertDType = "auto"
    expert_source: ExpertSource = "host"
    prefetch: bool = True
    prefetch_when_busy: PrefetchWhenBusy = DEFAULT_PREFETCH_WHEN_BUSY  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.expert_weights not in ("resident", "paged"):
            raise ConfigError(f"expert_weights={self.expert_weights!r}: choose resident or paged")
        if self.cache_policy not in CACHE_POLICIES:
            raise ConfigError(f"cache_policy={self.cache_policy!r}: choose lru or lfu")
        if self.expert_dtype not in ("auto", "bf16", "int8"):
            raise ConfigError(f"expert_dtype={self.expert_dtype!r}: choose auto (the model's dtype), bf16 or int8")
        if self.expert_source not in ("host", "shards"):
            raise ConfigError(f"expert_source={self.expert_source!r}: choose host (every expert in host memory) or "
                              "shards (read from the model's shards on a miss)")
        if self.prefetch_when_busy not in PREFETCH_WHEN_BUSY:
            raise ConfigError(f"prefetch_when_busy={self.prefetch_when_busy!r}: choose never, first (the likeliest "
                              "guess only) or always")
        if self.gpu_memory_gb is not None and self.gpu_memory_gb <= 0:
            raise ConfigError(f"gpu_memory_gb={self.gpu_memory_gb}: need a positive size in GB (or leave it unset "
                              "to size the cache from free memory)")
        if self.cache_slots is not None and self.cache_slots < 1:
            raise ConfigError(f"cache_slots={self.cache_slots}: need at least 1 expert slot")
        if self.expert_weights == "resident" and (self.expert_dtype != "auto" or self.gpu_memory_gb is not None
                                                  or self.cache_slots is not None or self.expert_source != "host"):
            raise ConfigError("expert_dtype, expert_source, gpu_memory_gb and cache_slots apply to paged experts "
                              "only; add expert_weights=paged (--expert_weights paged, or "
                              "--model.inference.expert_weights=paged for moetrain validate)")

    @property
    def paged(self) -> bool:
        return self.expert_weights == "paged"
