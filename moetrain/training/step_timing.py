"""Where a training step's time goes, from marks on the compute stream: forward and backward, the optimizer step, and
the time between two steps (the host's work outside both: Lightning's loop, callbacks, logging, the next batch).

A step is marked three times: ``start`` (its first micro-batch's ``training_step`` begins: the batch is on the
device), ``optimizer`` (its last backward has been queued) and ``end`` (the optimizer step and ``zero_grad`` have
been queued). On CUDA each mark is an event recorded on the current stream, so the figures are the GPU's clock and
no mark waits for anything; the figures of a step are read when its ``end`` has completed (by the time a metrics line
is written it has: the line reads the loss from the device), and left out otherwise rather than waited for. On the
CPU the marks are the host's clock (the work is done when it returns)::

    time/forward_backward_s   start -> optimizer       (compare: moetrain.bench.compute_only's step)
    time/optimizer_s          optimizer -> end          clipping, the dense AdamW, the experts' step
    time/between_steps_s      the previous end -> start the GPU waiting for the host between two steps
"""

from __future__ import annotations

import time
from typing import Optional, Union

import torch

from moetrain.offload.streams import recorded

Mark = Union[torch.cuda.Event, float]


class StepTimer:
    """The marks of the current and the previous step, and the figures they give."""

    MARKS = ("start", "optimizer", "end")

    def __init__(self) -> None:
        self._step: dict[str, Mark] = {}
        self._previous_end: Optional[Mark] = None

    def mark(self, name: str, device: torch.device) -> None:
        """Mark ``name`` (one of :data:`MARKS`) of the current step on ``device``'s current stream."""
        assert name in self.MARKS, name
        if name == "start":
            self._previous_end = self._step.get("end")
            self._step = {}
        event = recorded(device, timing=True)  # None on the CPU
        self._step[name] = event if event is not None else time.perf_counter()

    def figures(self) -> dict[str, float]:
        """Seconds of the last marked step's parts (see the module docstring); empty until a step has every mark or
        while its ``end`` is still running on the GPU."""
        if any(name not in self._step for name in self.MARKS) or not _done(self._step["end"]):
            return {}
        out = {"time/forward_backward_s": _seconds(self._step["start"], self._step["optimizer"]),
               "time/optimizer_s": _seconds(self._step["optimizer"], self._step["end"])}
        if self._previous_end is not None:
            out["time/between_steps_s"] = _seconds(self._previous_end, self._step["start"])
        return out


def _done(mark: Mark) -> bool:
    return mark.query() if isinstance(mark, torch.cuda.Event) else True


def _seconds(a: Mark, b: Mark) -> float:
    if isinstance(a, torch.cuda.Event):
        return a.elapsed_time(b) / 1e3
    return b - a
