"""Whether a hand-written Triton kernel may run: triton imports here, and its environment switch is not ``0``.

Each fused path (the expert step, the SwiGLU activation, the MoE combine) has an eager twin that stays for the CPU,
machines without triton and comparisons; ``MOETRAIN_FUSED_STEP``, ``MOETRAIN_FUSED_SWIGLU`` and
``MOETRAIN_FUSED_COMBINE`` set to ``0`` force the twin (read at every call: tests and benchmarks switch them).
"""

from __future__ import annotations

import os
from functools import lru_cache


@lru_cache(maxsize=1)
def triton_importable() -> bool:
    """triton imports in this environment (asked once)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def switched_on(env: str) -> bool:
    """False when the environment variable ``env`` is ``0``: the fused path it names is forced off."""
    return os.environ.get(env, "1").strip() != "0"
