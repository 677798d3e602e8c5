"""``step_on: auto`` keeps the faster of its two schedules, timed on the run's own steps.

The cost model (:func:`moetrain.offload.rates.split`) splits each layer's active experts between the GPU path
and the CPU path as if the layer's CPU share ran beside the link from the moment it is handed over. But one CPU
thread takes the shares of successive layers in turn, and the layers backward finishes last have no backward left
to hide their share under: it runs after backward, while the GPU waits. On the 4-layer DeepSeek-MoE-16B shape
with fp32 state (one H200, 32 768 tokens a step) the split's step took 1.255 s against 1.003 s with every expert
on the GPU, and 0.546 s of it was the tail after backward waiting for the CPU share (0.040 s on the GPU path).
Where the CPU is fast and backward is long (many micro-batches' worth of layers to hide under), the split wins.

A model of the whole queue would need each layer's backward time on this machine; timing both schedules is
simpler and cannot be wrong about this run. The process's first step is warm-up (not timed: the hot cache is
sized after it); steps 1 and 3 run the split, steps 2 and 4 run every expert on the GPU, and from the fifth on
the schedule with the shorter of its two timed steps is kept (a resumed run times them again: the machine may
have changed). Two trials each, interleaved, because a single early step is noisy: in one run the all-GPU trial
at step 2 took 1.19 s where the same schedule's steady state is 1.00 s, and auto kept the slower split. A step is
timed from the start of its first micro-batch to the start of the next step's, the device synchronized at those
marks only.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

SPLIT_STEPS, GPU_STEPS = (1, 3), (2, 4)  # the process's steps timed (0-based), interleaved
TIMED = frozenset(SPLIT_STEPS + GPU_STEPS)
LAST_TRIAL = max(TIMED)


class AutoSplit:
    """Which schedule a step of ``step_on: auto`` runs: ``auto`` (the cost model's split) or ``gpu``."""

    def __init__(self, step_on: str, device: torch.device) -> None:
        self.enabled = step_on == "auto"
        self.configured = step_on
        self.device = device
        self.seconds: dict[int, float] = {}  # timed step -> seconds
        self.choice: Optional[str] = None  # ``auto`` or ``gpu`` once both are timed
        self._start: Optional[float] = None  # when the step being timed began
        self._step = -1  # this process's current step, 0-based

    def step_on(self) -> str:
        """The schedule the current step runs."""
        if not self.enabled:
            return self.configured
        if self.choice is not None:
            return self.choice
        return "gpu" if self._step in GPU_STEPS else "auto"

    def step_started(self) -> None:
        """A step's first micro-batch is about to run: close the timed step before it, open this one if timed."""
        self._step += 1
        if not self.enabled or self.choice is not None or not (TIMED | {LAST_TRIAL + 1}) & {self._step}:
            return
        self._sync()
        now = time.perf_counter()
        if self._start is not None:  # the timed steps are consecutive: the one before this was timed
            self.seconds[self._step - 1] = now - self._start
        self._start = now
        if LAST_TRIAL in self.seconds:
            split, gpu = self.best(SPLIT_STEPS), self.best(GPU_STEPS)
            self.choice = "auto" if split < gpu else "gpu"

    def best(self, steps: tuple[int, ...]) -> float:
        """The shortest of ``steps``' timed seconds (inf if none is timed yet)."""
        return min((self.seconds[k] for k in steps if k in self.seconds), default=float("inf"))

    def figures(self) -> dict[str, float]:
        """Telemetry: each schedule's shortest timed step and whether auto now keeps every expert on the GPU."""
        if not self.enabled:
            return {}
        out = {}
        for name, steps in (("split", SPLIT_STEPS), ("gpu", GPU_STEPS)):
            if any(k in self.seconds for k in steps):
                out[f"offload/auto_trial_{name}_s"] = self.best(steps)
        if self.choice is not None:
            out["offload/auto_on_gpu"] = float(self.choice == "gpu")
        return out

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
