"""The training progress bar: optimizer steps (not micro-batches) with the loss, tokens/s, ETA and, with an
offload tier, the paging figures of the last logged step: link GB/s, stall seconds and the expert-cache hit
rate. It reads the numbers :class:`~moetrain.training.callbacks.MetricsLogger` has already computed, so it
adds no device synchronisation of its own. Quiet unless stderr is a terminal (``progress.enabled`` forces it).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import lightning as L

from moetrain.progress import set_forced, stderr_is_terminal


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
