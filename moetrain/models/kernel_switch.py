"""Whether a hand-written Triton kernel may run (triton imports here, and its environment switch is not ``0``), and
the device context its launch runs in.

Each fused path (the expert step, the SwiGLU activation, the MoE combine, RMSNorm, the rotary embedding) has an
eager twin that stays for the CPU, machines without triton and comparisons; ``MOETRAIN_FUSED_STEP``,
``MOETRAIN_FUSED_SWIGLU``, ``MOETRAIN_FUSED_COMBINE``, ``MOETRAIN_FUSED_RMSNORM`` and ``MOETRAIN_FUSED_ROPE`` set to
``0`` force the twin (read at every call: tests and benchmarks switch them).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache

import torch


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


def launch_device(device: torch.device) -> AbstractContextManager:
    """Triton launches on the current CUDA device: the context that makes ``device`` current for a launch when it is
    another CUDA device (nothing to do otherwise, the CPU under the interpreter included)."""
    elsewhere = device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device()
    return torch.cuda.device(device) if elsewhere else nullcontext()
