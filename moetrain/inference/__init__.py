"""Inference with only the routed experts on the device: paged expert weights, a device-side expert cache
(LRU or LFU), prefetch of the next layer's likely experts, grouped GEMMs for prefill and validation, int8 expert
weights, and experts read from the model's shards on demand.

Usage. Generation (the cache sized from free GPU memory, or ``--gpu_memory_gb`` / ``--cache_slots``)::

    moetrain generate --ckpt runs/mixtral --prompt "Once upon a time" --expert_weights paged \
        --gpu_memory_gb 60 --cache_policy lfu [--expert_dtype int8] [--expert_source shards]

Validation of a model larger than the GPU (the experts go straight into host memory, or stay in the shards with
``expert_source=shards``; ``--ckpt_path`` loads into a model built without expert weights)::

    moetrain validate --config recipes/tiny.yaml --ckpt_path=runs/tiny \
        --model.inference.expert_weights=paged --model.inference.gpu_memory_gb=60 \
        --model.inference.cache_policy=lfu [--model.inference.expert_dtype=int8]

The cache's telemetry (hit rate beside the ideal static cache's, bytes paged per token) goes to stderr. bf16
against int8 on a GPU, decode tokens/s and validation loss in one run (a random Mixtral-8x7B-shaped directory
of 4 layers; ``--val_data FILE.jsonl --tokenizer DIR`` scores text instead of random token ids)::

    moetrain bench paged_generate --preset mixtral-8x7b --layers 4 --make_dir /tmp/mixtral-4l --new_tokens 64 \
        --out /tmp/bench-paged

From Python:

* :func:`load_paged` (``moetrain.from_pretrained(path, expert_weights="paged", cache_slots=..., ...)``): load a
  model whose routed experts live in host memory (``expert_source="shards"``: in the memory-mapped shards).
* :func:`install_paged_experts`: page the experts of a model already loaded.
* :func:`paged_cache`: the cache of a paged model (its ``stats`` and routing ``trace``).

What a prefetch may copy while the link is busy (``prefetch_when_busy``) and why the default is what it is:
:mod:`moetrain.inference.policy`; the CPU surrogate those predictions come from (recorded routing replayed through
the cache, timed by a model calibrated on an H200 run): :mod:`moetrain.inference.surrogate`.
"""

from moetrain.inference.cache import CacheStats, ExpertCache, ideal_static_hit_rate
from moetrain.inference.config import InferenceConfig
from moetrain.inference.paged import PagedExperts, install_paged_experts, load_paged, paged_cache
from moetrain.inference.store import HostExpertStore, ShardExpertStore

__all__ = ["CacheStats", "ExpertCache", "HostExpertStore", "InferenceConfig", "PagedExperts", "ShardExpertStore",
           "ideal_static_hit_rate", "install_paged_experts", "load_paged", "paged_cache"]
