"""Progress bars: optimizer steps during training, and long loops (saves, loads, imports) elsewhere.

Both are quiet unless stderr is a terminal, so logs and CI output stay clean; ``progress.enabled``
forces the training bar on or off.

The training bar counts optimizer steps (not micro-batches) and shows the loss, tokens/s, ETA and,
with an offload tier, the paging figures of the last logged step: link GB/s, stall seconds and the
expert-cache hit rate. It reads the numbers :class:`~moetrain.training.callbacks.MetricsLogger` has
already computed, so it adds no device synchronisation of its own.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, Optional, TypeVar

import lightning as L

T = TypeVar("T")


def stderr_is_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress_iter(iterable: Iterable[T], total: Optional[int] = None, desc: str = "", unit: str = "it",
                  enabled: Optional[bool] = None) -> Iterator[T]:
    """``iterable`` with a tqdm bar on stderr when it is a terminal (``enabled`` None), else unchanged.

    For long loops outside training: writing checkpoint shards, loading them, importing a Hugging Face model.
    """
    if not (stderr_is_terminal() if enabled is None else enabled):
        yield from iterable
        return
    from tqdm.auto import tqdm

    with tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        yield from bar


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    out = {}
    if isinstance(record.get("loss"), (int, float)):
        out["loss"] = f"{record['loss']:.4f}"
    if "tokens_per_s" in record:
        out["tok/s"] = f"{record['tokens_per_s']:.0f}"
    if "offload/link_gbps" in record:
        out["link"] = f"{record['offload/link_gbps']:.1f}GB/s"
    if "offload/stall_s" in record:
        out["stall"] = f"{record['offload/stall_s']:.2f}s"
    if "offload/cache_hit_rate" in record:
        out["hit"] = f"{record['offload/cache_hit_rate']:.0%}"
    return out


class StepProgress(L.Callback):
    """A tqdm bar over optimizer steps (the ``progress:`` section of a recipe)."""

    def __init__(self, enabled: Optional[bool] = None) -> None:
        """
        Args:
            enabled: show the bar; None: only when stderr is a terminal.
        """
        self.enabled = enabled
        self.bar: Any = None
        self._seen_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not (stderr_is_terminal() if self.enabled is None else self.enabled):
            return
        from tqdm.auto import tqdm

        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.bar = tqdm(total=total, initial=trainer.global_step, unit="step", desc="fit", file=sys.stderr,
                        dynamic_ncols=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stats = getattr(pl_module, "last_step", None)
        if self.bar is None or stats is None or stats.step == self._seen_step:
            return
        self._seen_step = stats.step
        self.bar.update(stats.step - self.bar.n)
        record = next((cb.last_record for cb in trainer.callbacks if hasattr(cb, "last_record")), {})
        if record.get("step") == stats.step:
            self.bar.set_postfix(_postfix(record), refresh=False)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()
