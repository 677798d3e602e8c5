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

Each micro-batch's start is marked too (:meth:`StepTimer.mark_micro`), so a slow forward and backward says whether one
micro-batch was slow (a pause of the host: a garbage collection, a lock) or all of them were::

    time/micro_batch_median_s       the median micro-batch, on the GPU's clock
    time/micro_batch_max_s          the slowest one, and its index in the step (time/micro_batch_max_index)
    time/micro_batch_host_max_s     the longest the host spent issuing one (its clock; a sync inside waits)
    host/gc_s, host/gc_collections  Python's garbage collections since the previous metrics line
    host/gc_gen2_s                  the share of them that were full (generation 2) collections
"""

from __future__ import annotations

import gc
import statistics
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
        # the current step's micro-batch starts, each with the host's clock then (the first is the step's ``start``)
        self._micro: list[tuple[Mark, float]] = []
        self._optimizer_host = 0.0  # the host's clock at the ``optimizer`` mark: the last micro-batch's end
        self._gc_read = _GC.snapshot()
        _GC.install()

    def mark_micro(self, index: int, device: torch.device) -> None:
        """Micro-batch ``index`` of the current step begins (0 also marks the step's ``start``)."""
        if index == 0:
            self.mark("start", device)
            self._micro = [(self._step["start"], time.perf_counter())]
        else:
            self._micro.append((_now(device), time.perf_counter()))

    def mark(self, name: str, device: torch.device) -> None:
        """Mark ``name`` (one of :data:`MARKS`) of the current step on ``device``'s current stream."""
        assert name in self.MARKS, name
        if name == "start":
            self._previous_end = self._step.get("end")
            self._step = {}
        self._step[name] = _now(device)
        if name == "optimizer":
            self._optimizer_host = time.perf_counter()

    def figures(self) -> dict[str, float]:
        """Seconds of the last marked step's parts (see the module docstring); empty until a step has every mark or
        while its ``end`` is still running on the GPU."""
        if any(name not in self._step for name in self.MARKS) or not _done(self._step["end"]):
            return {}
        out = {"time/forward_backward_s": _seconds(self._step["start"], self._step["optimizer"]),
               "time/optimizer_s": _seconds(self._step["optimizer"], self._step["end"])}
        if self._previous_end is not None:
            out["time/between_steps_s"] = _seconds(self._previous_end, self._step["start"])
        if self._micro and self._micro[0][0] is self._step["start"]:  # the micro-batches of this step were marked
            marks = [m for m, _ in self._micro] + [self._step["optimizer"]]
            host = [h for _, h in self._micro] + [self._optimizer_host]
            each = [_seconds(a, b) for a, b in zip(marks, marks[1:], strict=False)]
            slowest = max(range(len(each)), key=each.__getitem__)
            out.update({"time/micro_batch_median_s": statistics.median(each), "time/micro_batch_max_s": each[slowest],
                        "time/micro_batch_max_index": float(slowest),
                        "time/micro_batch_host_max_s": max(b - a for a, b in zip(host, host[1:], strict=False))})
        now = _GC.snapshot()
        seconds, count, full = (b - a for a, b in zip(self._gc_read, now, strict=True))
        self._gc_read = now
        return out | {"host/gc_s": seconds, "host/gc_collections": float(count), "host/gc_gen2_s": full}


class _GcClock:
    """Python's garbage collections, timed: one ``gc.callbacks`` entry for the process, read as running totals
    (seconds, collections, seconds of full collections)."""

    def __init__(self) -> None:
        self.seconds = self.full = 0.0
        self.count = 0
        self._began = 0.0
        self._installed = False

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True

    def snapshot(self) -> tuple[float, int, float]:
        return self.seconds, self.count, self.full

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        spent = time.perf_counter() - self._began
        self.seconds += spent
        self.count += 1
        if info.get("generation") == 2:
            self.full += spent


_GC = _GcClock()


def _now(device: torch.device) -> Mark:
    """A mark of now: an event recorded on ``device``'s current stream, the host's clock on the CPU."""
    event = recorded(device, timing=True)  # None on the CPU
    return event if event is not None else time.perf_counter()


def _done(mark: Mark) -> bool:
    return mark.query() if isinstance(mark, torch.cuda.Event) else True


def _seconds(a: Mark, b: Mark) -> float:
    if isinstance(a, torch.cuda.Event):
        return a.elapsed_time(b) / 1e3
    return b - a
