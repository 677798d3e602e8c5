"""The CUDA caching allocator's settings moetrain runs with, unless the user chose their own.

An offloaded step allocates and frees blocks of many sizes (activations of each micro-batch, the stacked expert
gradients, state slots, the hot cache grown after step 1). With fixed-size segments the allocator keeps freed
segments that no later request fits; expandable segments map one growing virtual range instead, so what is
reserved tracks what is allocated. On one H200 the DeepSeek-MoE-16B recipe held 132.5 GiB of the card
(nvidia-smi) for a 106.8 GiB allocated peak without them (run p3), and still 138.6 GiB for a 113.7 GiB peak with
them (run q3): most of that gap is not the allocator's reserve. ``gpu/mem_reserved_gib`` and
``gpu/device_used_gib`` in ``metrics.jsonl`` tell the two apart.

The allocator reads its settings once, when CUDA is first used, so :func:`apply_defaults` runs at the start of
the command line, before anything touches the GPU.
"""

from __future__ import annotations

import os

SETTINGS_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch's current name, then the older one
DEFAULT = "expandable_segments:True"


def apply_defaults() -> None:
    """Set :data:`DEFAULT` as the allocator's settings unless the environment sets any."""
    if not any(os.environ.get(name) for name in SETTINGS_ENV):
        os.environ[SETTINGS_ENV[0]] = DEFAULT

