"""CUDA streams and events that collapse to nothing on a CPU stand-in device.

Every part of the engine (swapper, weight pager, CPU step path, telemetry) queues copies on side streams and
orders them with events. On a CPU device there are no streams: the helpers here return ``None`` or a null
context, so the same bookkeeping runs in CI without a branch at every call site.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Optional

import torch


def event(device: torch.device, timing: bool = False) -> Optional[torch.cuda.Event]:
    """A CUDA event on a CUDA ``device`` (with ``timing``: one that ``elapsed_time`` can read), else None."""
    return torch.cuda.Event(enable_timing=timing) if device.type == "cuda" else None


def recorded(device: torch.device, timing: bool = False) -> Optional[torch.cuda.Event]:
    """:func:`event`, already recorded on the current stream (None on a CPU device)."""
    e = event(device, timing)
    if e is not None:
        e.record(torch.cuda.current_stream(device))
    return e


def side_stream(device: torch.device) -> Optional[torch.cuda.Stream]:
    """A new stream on a CUDA ``device`` (copies queued there overlap with compute), else None."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def on(stream: Optional[torch.cuda.Stream]) -> AbstractContextManager:
    """Queue the work of the ``with`` body on ``stream`` (the current stream when None)."""
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


def wait(device: torch.device, e: Optional[torch.cuda.Event]) -> None:
    """The current stream waits for ``e`` (no host sync); nothing on a CPU device."""
    if e is not None:
        torch.cuda.current_stream(device).wait_event(e)
