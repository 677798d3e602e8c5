"""Training callbacks: ``metrics.jsonl``, one JSON object per logged optimizer step.

Each line is written and flushed as soon as the step is logged, so a crash loses nothing that was
logged. Fields: ``step, loss, ce_loss, aux_loss, lr, grad_norm, tokens, tokens_per_s, elapsed_s``
plus whatever the optimizer's optional ``telemetry()`` returns (the offload engine's counters).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import IO, Any, Optional

import lightning as L

METRICS_FILE = "metrics.jsonl"


def _number(value: Any) -> Any:
    """A JSON-safe scalar: tensors become Python numbers, NaN/inf become strings (JSON has neither)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger(L.Callback):
    """Append one line per logged optimizer step to ``<trainer.default_root_dir>/metrics.jsonl``.

    ``tokens`` counts every input token trained on so far; ``tokens_per_s`` is the throughput since
    the previous logged line (the first window includes start-up work such as the first compiles).
    A resumed run appends to the same file.
    """

    def __init__(self, filename: str = METRICS_FILE) -> None:
        """
        Args:
            filename: file name inside the run directory.
        """
        self.filename = filename
        self.path: Optional[Path] = None
        self._file: Optional[IO[str]] = None
        self._start = 0.0
        self._window_start = 0.0
        self._window_tokens = 0
        self._tokens = 0
        self._seen_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path = Path(trainer.default_root_dir) / self.filename
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")
        self._start = self._window_start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stats = getattr(pl_module, "last_step", None)
        if stats is None or stats.step == self._seen_step:
            return  # a micro-batch that did not end an optimizer step
        self._seen_step = stats.step
        self._tokens += stats.tokens
        self._window_tokens += stats.tokens
        if not stats.should_log:
            return
        now = time.perf_counter()
        record = {
            "step": stats.step,
            "loss": _number(stats.loss),
            "ce_loss": _number(stats.ce_loss),
            "aux_loss": _number(stats.aux_loss),
            "lr": stats.lr,
            "grad_norm": _number(stats.grad_norm),
            "tokens": self._tokens,
            "tokens_per_s": round(self._window_tokens / max(now - self._window_start, 1e-9), 1),
            "elapsed_s": round(now - self._start, 3),
        }
        for source in (getattr(getattr(pl_module, "train_optimizer", None), "telemetry", None),
                       getattr(pl_module, "step_metrics", None)):
            if callable(source):
                for key, value in source().items():
                    record.setdefault(key, _number(value))
        self._window_start, self._window_tokens = now, 0
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
