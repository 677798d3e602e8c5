"""Stop a run cleanly before the kernel's OOM killer does.

When a machine runs out of host memory, Linux's OOM killer ends the largest process with SIGKILL: no message, no
checkpoint on signal, nothing in the run directory says why. A fit of DeepSeek-MoE-16B on one H200 ended that way
(benchmarks/README.md, runs q1 to q3). :class:`HostMemoryGuard` reads the machine's available memory
(``MemAvailable``, what can be had without swapping) before every micro-batch, about 20 microseconds, and when it
falls below a floor it stops training with :class:`HostMemoryLow`: the CLI turns it into the one-paragraph "host
memory ran out" error with the settings to change, and the message says how much this process's private heap
grew since the first step (a figure that grows from step to step is a leak, not a setting).
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

from moetrain.training.telemetry import host_memory, proc_gib

FLOOR_SHARE = 0.015  # of the machine's memory: 1.9 GiB of 125 GiB, a few seconds of a fast leak
FLOOR_MIN_GIB = 1.0


class HostMemoryLow(MemoryError):
    """The machine's available host memory fell below the guard's floor during training."""


def read_meminfo() -> Optional[tuple[float, float]]:
    """(MemAvailable, MemTotal) in GiB from ``/proc/meminfo``; None where there is none."""
    found = proc_gib("/proc/meminfo", {"MemAvailable": "available", "MemTotal": "total"})
    return (found["available"], found["total"]) if len(found) == 2 else None


class HostMemoryGuard(Callback):
    """Raise :class:`HostMemoryLow` before a micro-batch when available host memory is below the floor
    (``max(1 GiB, 1.5% of the machine)``); off where ``/proc/meminfo`` does not exist."""

    def __init__(self, reader=read_meminfo) -> None:
        self.reader = reader
        self.baseline_gib: Optional[float] = None  # this process's private heap when the first step ended

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        info = self.reader()
        if info is None:
            return
        available, total = info
        if self.baseline_gib is None and trainer.global_step >= 1:
            self.baseline_gib = host_memory().get("host/rss_anon_gib")
        floor = max(FLOOR_MIN_GIB, FLOOR_SHARE * total)
        if available >= floor:
            return
        heap = host_memory().get("host/rss_anon_gib")
        grew = ""
        if heap is not None and self.baseline_gib is not None:
            grew = (f"; this process's private memory grew from {self.baseline_gib:.1f} GiB after step 1 to "
                    f"{heap:.1f} GiB at step {trainer.global_step + 1} (host/rss_anon_gib in metrics.jsonl: a figure "
                    "that grows every step is a leak, not a setting)")
        raise HostMemoryLow(f"{available:.1f} GiB of {total:.0f} GiB host memory left before a micro-batch of step "
                            f"{trainer.global_step + 1}, below the {floor:.1f} GiB floor; training stopped before the "
                            f"kernel's OOM killer would end it without a word{grew}")
