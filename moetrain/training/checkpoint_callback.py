"""The ``checkpoint:`` section of a recipe: when to save (every ``every_n_steps`` optimizer steps, at the end of
training, on SIGTERM/Ctrl-C), synchronously (:func:`~moetrain.training.checkpoint.save_checkpoint`), in a
background thread (:class:`~moetrain.training.async_checkpoint.AsyncSaver`) or, with several ranks, collectively.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from moetrain.config import ConfigError
from moetrain.training import signals, trainer_state
from moetrain.training.async_checkpoint import AsyncSaver
from moetrain.training.checkpoint import CHECKPOINTS_DIR, save_checkpoint, step_dir_name


class CheckpointCallback(L.Callback):
    """Save a checkpoint every ``every_n_steps`` optimizer steps, at the end of training, and on SIGTERM/Ctrl-C
    (the ``checkpoint:`` section of a recipe)."""

    def __init__(self, every_n_steps: int = 0, max_shard_mb: int = 2048, save_final: bool = True,
                 keep_last: int = 0, save_on_signal: bool = True, **options: Any) -> None:
        """
        Args:
            every_n_steps: save every this many optimizer steps (0: only at the end).
            max_shard_mb: size of one safetensors shard in MiB.
            save_final: save when training ends.
            keep_last: keep only this many newest checkpoints (0: keep all).
            save_on_signal: on SIGTERM or Ctrl-C, finish the optimizer step, save and stop.
            options: ``async`` (a Python keyword, hence passed this way; the recipe key is
                ``checkpoint.async``): write checkpoints in a background thread while training goes on
                (:mod:`moetrain.training.async_checkpoint`); the final and the signal save still complete
                before training returns.
        """
        if every_n_steps < 0 or max_shard_mb <= 0 or keep_last < 0:
            raise ConfigError("checkpoint.every_n_steps and checkpoint.keep_last must be >= 0 and "
                              "checkpoint.max_shard_mb > 0")
        unknown = sorted(set(options) - {"async"})
        if unknown:
            raise ConfigError(f"checkpoint.{unknown[0]}: not a checkpoint option; the section takes every_n_steps, "
                              "max_shard_mb, save_final, keep_last, save_on_signal and async")
        self.every_n_steps = every_n_steps
        self.max_shard_bytes = max_shard_mb * 2**20
        self.keep_last = keep_last
        self.save_final = save_final
        self.save_on_signal = save_on_signal
        self.async_save = options.get("async", False)
        if not isinstance(self.async_save, bool):
            raise ConfigError(f"checkpoint.async={self.async_save!r}: must be true or false")
        self.saver: Optional[AsyncSaver] = AsyncSaver() if self.async_save else None
        self.saved_step = -1
        self.saved_path: Optional[Path] = None
        """The checkpoint directory this run saved last (None: none yet); the CLI names it after a signal."""
        self._seen_step = -1
        self._epoch = 0  # the epoch being trained (Lightning's counter moves on when max_steps ends one early)
        self._epoch_batches = 0
        self._resume: Optional[tuple[int, int]] = None  # (epoch, batches consumed in it) of a resumed run

    # ------------------------------------------------------------------ resume
    def resume_position(self, epoch: int, batches_in_epoch: int) -> None:
        """Called by :func:`moetrain.training.trainer_state.restore`: where the resumed run starts."""
        self._resume = (epoch, batches_in_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch, self._epoch_batches = trainer.current_epoch, 0
        if self._resume is not None and self._resume[0] == trainer.current_epoch:
            self._epoch_batches = self._resume[1]
        self._resume = None

    # ------------------------------------------------------------------ saving
    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule, wait: bool = False) -> None:
        """Save at this optimizer-step boundary; ``wait``: return only once it is on disk (async mode)."""
        step = trainer.global_step
        parallel = getattr(pl_module, "parallel", None)
        collective = parallel is not None and parallel.active  # several ranks: each writes its share
        if step == self.saved_step or step == 0 or not (trainer.is_global_zero or collective):
            if wait and self.saver is not None:
                self.saver.wait()
            return
        datamodule = getattr(trainer, "datamodule", None)
        save = save_checkpoint if self.saver is None else self.saver.save
        if collective:
            save = parallel.save_checkpoint  # synchronous: a collective over every rank
        save(
            trainer.default_root_dir, step, pl_module.model, optimizer=pl_module.train_optimizer,
            trainer_state=trainer_state.capture(trainer, pl_module, epoch=self._epoch,
                                                batches_in_epoch=self._epoch_batches),
            recipe=getattr(pl_module, "resolved_recipe", None), max_shard_bytes=self.max_shard_bytes,
            keep_last=self.keep_last, tokenizer_dir=getattr(datamodule, "tokenizer_path", None),
        )
        self.saved_step = step
        self.saved_path = Path(trainer.default_root_dir) / CHECKPOINTS_DIR / step_dir_name(step)
        if wait and self.saver is not None:
            self.saver.wait()

    # ------------------------------------------------------------------ async: the store is read in place
    def _wait_for_store(self) -> None:
        if self.saver is not None and self.saver.holds_store:
            self.saver.wait_for_store()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.saver is None:
            return
        # A failed background save stops training at the next batch. (With idle_experts: dense the forward
        # replays missed steps into the store, but only of steps taken after the save's snapshot, which
        # caught every expert up: the optimizer step, where the guard below waits, comes first.)
        self.saver.raise_error()

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Any) -> None:
        if self.saver is None or not self.saver.holds_store:
            return
        # without clipping, the last micro-batch's backward steps each layer's experts as it finishes it
        optimizer = pl_module.train_optimizer
        if optimizer is not None and optimizer.steps_during_backward():
            self._wait_for_store()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._wait_for_store()

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_on_signal:
            signals.install()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._epoch_batches += 1
        stats = getattr(pl_module, "last_step", None)
        if stats is None or stats.step == self._seen_step or not pl_module.at_step_boundary:
            return  # a micro-batch inside an accumulation group: no consistent state to save
        self._seen_step = stats.step
        if self.every_n_steps and stats.step % self.every_n_steps == 0:
            self._save(trainer, pl_module)
        if self.save_on_signal and self._stop_requested(pl_module):
            self._save(trainer, pl_module, wait=True)
            trainer.should_stop = True

    @staticmethod
    def _stop_requested(pl_module: L.LightningModule) -> bool:
        """Whether a signal asks to stop at this step boundary. With several ranks: whether any rank received
        one, so that all save together and stop at the same step (a signal reaches the ranks at different
        moments, or only one of them; a rank alone in the collective save would wait for ever)."""
        requested = signals.requested() is not None
        parallel = getattr(pl_module, "parallel", None)
        if parallel is None or not parallel.active:
            return requested
        flag = torch.tensor([float(requested)], device=pl_module.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # 4 bytes a step
        return bool(flag.item())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            if self.save_final:
                self._save(trainer, pl_module, wait=True)
            elif self.saver is not None:
                self.saver.wait()  # a periodic save still being written
        finally:
            signals.uninstall()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.saver is not None:
            # let a save under way land (or fail); the exception that stops training is the one to report
            self.saver.discard_error()
        signals.uninstall()
