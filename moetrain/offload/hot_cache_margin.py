"""The memory the automatic hot-expert cache (``hot_cache_gb: null``) leaves free, in one place for the two that
size it: the engine after step 1 (:meth:`moetrain.offload.engine.ExpertEngine._auto_hot_cache`) and the planner,
which mirrors the engine's rule (:func:`moetrain.offload.plan.memory.make_plan`).

The margin holds what later steps allocate beyond step 1's peak: among it the dense parameters' AdamW moments,
which torch creates in the first ``optimizer.step()``, and the caching allocator's fragmentation.
"""

from __future__ import annotations

HOT_CACHE_MARGIN_SHARE = 0.10
"""Share of the device memory the process may use that the automatic hot cache leaves free."""
HOT_CACHE_MARGIN_BYTES = 2**30
"""Bytes the automatic hot cache leaves free on top of :data:`HOT_CACHE_MARGIN_SHARE` of the device."""
