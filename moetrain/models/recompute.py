"""Whether the running forward pass is the re-run that activation checkpointing makes during backward.

The MoE block, the experts' forward prefetch and the look-ahead all ask, so it lives below them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_recompute = threading.local()


@contextmanager
def recomputing() -> Iterator[None]:
    """Marks the forward pass that activation checkpointing re-runs during backward (in the thread that runs
    backward). Its routing was already observed by the first pass, so observers, the look-ahead and forward
    prefetch stay quiet: counts are not doubled and no page-in goes the wrong way."""
    previous = getattr(_recompute, "on", False)
    _recompute.on = True
    try:
        yield
    finally:
        _recompute.on = previous


def is_recomputing() -> bool:
    """Whether this thread is inside :func:`recomputing`."""
    return getattr(_recompute, "on", False)
