"""Progress bars: optimizer steps during training, and long loops (saves, loads, imports) elsewhere.

Both are quiet unless stderr is a terminal, so logs and CI output stay clean; ``progress.enabled``
forces the training bar on or off, and :func:`forced` (which the training bar applies for its run)
does the same for the bars of long loops: checkpoint saves and loads, Hugging Face imports, exports.

The training bar counts optimizer steps (not micro-batches) and shows the loss, tokens/s, ETA and,
with an offload tier, the paging figures of the last logged step: link GB/s, stall seconds and the
expert-cache hit rate. It reads the numbers :class:`~moetrain.training.callbacks.MetricsLogger` has
already computed, so it adds no device synchronisation of its own.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, TypeVar

import lightning as L

T = TypeVar("T")


_forced: Optional[bool] = None  # set by forced(): overrides the terminal check of long-loop bars


def stderr_is_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def shown(enabled: Optional[bool] = None) -> bool:
    """Whether a long-loop bar is drawn: ``enabled`` if given, else :func:`forced`'s setting, else a terminal."""
    if enabled is not None:
        return enabled
    return stderr_is_terminal() if _forced is None else _forced


def set_forced(enabled: Optional[bool]) -> Optional[bool]:
    """Long-loop bars follow ``enabled`` from now on (None: the terminal decides); returns the previous setting."""
    global _forced
    before, _forced = _forced, enabled
    return before


@contextmanager
def forced(enabled: Optional[bool]) -> Iterator[None]:
    """Within the block, long-loop bars follow ``enabled`` (None: the terminal decides)."""
    before = set_forced(enabled)
    try:
        yield
    finally:
        set_forced(before)


def progress_iter(iterable: Iterable[T], total: Optional[int] = None, desc: str = "", unit: str = "it",
                  enabled: Optional[bool] = None) -> Iterator[T]:
    """``iterable`` with a tqdm bar on stderr when it is a terminal (``enabled`` None), else unchanged.

    For long loops outside training: writing checkpoint shards, loading them, importing a Hugging Face model.
    """
    if not shown(enabled):
        yield from iterable
        return
    from tqdm.auto import tqdm

    with tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        yield from bar


def shard_progress(stream: Iterable[tuple[Path, str, Any]], total: Optional[int], desc: str,
                   enabled: Optional[bool] = None) -> Iterator[tuple[Path, str, Any]]:
    """``(shard path, name, tensor)`` items passed through, with a bar that counts shards as the path changes.

    ``total``: the number of shard files (None: unknown). Used by every streaming checkpoint read.
    """
    if not shown(enabled):
        yield from stream
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="shard", file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        current = None
        for item in stream:
            if item[0] != current:
                if current is not None:
                    bar.update(1)
                current = item[0]
                bar.set_postfix_str(Path(current).name, refresh=False)
            yield item
        if current is not None:
            bar.update(1)


def tensor_progress(stream: Iterable[tuple[str, Any]], desc: str, total_bytes: Optional[int] = None,
                    enabled: Optional[bool] = None) -> Iterator[tuple[str, Any]]:
    """``(name, tensor)`` items passed through, with a bar in bytes (for writes, whose shards are cut as the
    bytes arrive, so bytes are what is known ahead)."""
    if not shown(enabled):
        yield from stream
        return
    from tqdm.auto import tqdm

    with tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              dynamic_ncols=True, leave=False) as bar:
        for name, tensor in stream:
            yield name, tensor
            bar.update(tensor.numel() * tensor.element_size())


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
    """A tqdm bar over optimizer steps (the ``progress:`` section of a recipe); while it is set up, its
    ``enabled`` also decides the bars of checkpoint saves and loads inside the run."""

    def __init__(self, enabled: Optional[bool] = None) -> None:
        """
        Args:
            enabled: show the bar; None: only when stderr is a terminal.
        """
        self.enabled = enabled
        self.bar: Any = None
        self._seen_step = -1
        self._forced_before: Optional[bool] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._forced_before = set_forced(self.enabled if trainer.is_global_zero else False)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        set_forced(self._forced_before)  # after on_train_end: the final checkpoint's bar follows the setting too

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
