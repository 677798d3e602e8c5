"""Inference with only the routed experts on the device: paged expert weights, a device-side expert cache
(LRU or LFU), prefetch of the next layer's likely experts, and int8 expert weights.

* :func:`load_paged` (``moetrain.from_pretrained(path, expert_weights="paged")``): load a model whose routed
  experts live in host memory.
* :func:`install_paged_experts`: page the experts of a model already loaded.
* :func:`paged_cache`: the cache of a paged model (its ``stats`` and routing ``trace``).
"""

from moetrain.inference.cache import CacheStats, ExpertCache, ideal_static_hit_rate
from moetrain.inference.config import InferenceConfig
from moetrain.inference.paged import PagedExperts, install_paged_experts, load_paged, paged_cache
from moetrain.inference.store import HostExpertStore

__all__ = ["CacheStats", "ExpertCache", "HostExpertStore", "InferenceConfig", "PagedExperts", "ideal_static_hit_rate",
           "install_paged_experts", "load_paged", "paged_cache"]
