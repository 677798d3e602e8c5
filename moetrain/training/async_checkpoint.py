"""Asynchronous checkpoint saves (``checkpoint.async: true``): a background thread writes the files while
training goes on, and what it writes is the state of one step boundary, never a torn mix of two steps.

At the optimizer-step boundary where a save is due, on the training thread (:meth:`AsyncSaver.save`)::

    dense weights and buffers        copied to host memory (the dense part only: a few GB at most,
    dense AdamW moments, step counts while the routed experts are ~90% of an MoE's bytes)
    expert state (offload engine)    made current (deferred catch-up applied, page-outs landed), then
                                     left where it lives, host slab or swap file: not copied
    trainer state, RNG, counters     captured as a synchronous save captures them

then a writer thread runs :func:`~moetrain.training.checkpoint.write_checkpoint` on that snapshot::

    training thread  step N |save| fwd/bwd N+1 ...................| wait? |step N+1| fwd/bwd N+2 ...
    writer thread           |    | model shards | optimizer shards |-> store free | fsync, rename, last

The expert records are read in place, so the first operation after the save that would write them
waits until the writer has read them (:meth:`AsyncSaver.wait_for_store`); the checkpoint callback asks
before the optimizer step and before a backward that steps layers early (no clipping, last micro-batch).
(A forward that replays idle experts' missed steps, ``idle_experts: dense``, replays only steps taken
after the snapshot, which caught every expert up, so it never comes first.) When the write is faster
than a step's forward and backward, nothing waits. Host memory stays bounded: the dense snapshot
plus about two shards, never a copy of the expert state.

The writer reads expert records through the streams of ``checkpoint_state(background=True)``: the offload
engine reads them through a shallow copy of itself with its own staging buffer and swap-file channel, whose
``finalize`` is a no-op (it ran on the training thread at the snapshot), so the swapper, its streams and its
I/O channel stay the training thread's alone.

One save at a time: a save due while the previous one is still being written waits for it. An error
of the writer (a full disk) is kept and raised on the training thread at its next wait, the same
exception a synchronous save raises; the previous checkpoint and ``last`` are untouched, as the
writer switches ``last`` only after the new directory is complete.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

from moetrain.models.decoder import MoEForCausalLM
from moetrain.optim import CheckpointState, TrainOptimizer
from moetrain.training.checkpoint import model_tensors, write_checkpoint
from moetrain.training.optimizer_state import save_optimizer


def _host_copy(value: Any) -> Any:
    return value.detach().to("cpu", copy=True) if torch.is_tensor(value) else value


class _DenseSnapshot(torch.optim.Optimizer):
    """A torch optimizer's parameter groups with a host copy of its state, as the optimizer-state writer reads
    them (``param_groups`` and ``state``); it never steps, so ``Optimizer.__init__`` is deliberately not run."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:  # noqa: D107
        self.param_groups = [{"params": list(group["params"])} for group in inner.param_groups]
        self.state = {p: {k: _host_copy(v) for k, v in s.items()} for p, s in inner.state.items()}


class AsyncSaver:
    """Writes checkpoints in a background thread; see the module docstring for what is copied and when
    the training thread waits."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._store_free = threading.Event()
        self._store_free.set()
        self.last_saved: Optional[Path] = None
        """The directory of the newest checkpoint this saver completed."""

    # ------------------------------------------------------------------ state
    @property
    def busy(self) -> bool:
        """A save is being written."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def holds_store(self) -> bool:
        """The writer still reads expert records in place (the optimizer must not write them yet)."""
        return not self._store_free.is_set()

    # ------------------------------------------------------------------ waiting
    def raise_error(self) -> None:
        """Raise, on the calling thread, the error of a finished write (once), if there was one."""
        if self._error is not None and not self.busy:
            error, self._error = self._error, None
            raise error

    def wait_for_store(self) -> None:
        """Block until the writer has read every expert record (then the store may change); raise its error."""
        self._store_free.wait()
        if self._error is not None:
            self.wait()

    def wait(self) -> None:
        """Block until the current save is on disk and ``last`` names it; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.raise_error()

    def discard_error(self) -> Optional[BaseException]:
        """Wait for the writer and return its error without raising it (when another error is on its way)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        return error

    # ------------------------------------------------------------------ saving
    @torch.no_grad()
    def save(self, run_dir: str | Path, step: int, model: MoEForCausalLM, *, optimizer: Optional[TrainOptimizer] = None,
             trainer_state: Optional[dict[str, Any]] = None, recipe: Optional[str] = None,
             max_shard_bytes: int = 2 * 2**30, keep_last: int = 0,
             tokenizer_dir: Optional[str | Path] = None) -> None:
        """Snapshot the state of this step boundary and start writing it (arguments as
        :func:`~moetrain.training.checkpoint.save_checkpoint`). Returns once the writer has started."""
        self.wait()  # one save at a time; a failed one raises here
        snapshot: Optional[CheckpointState] = None
        experts: set[str] = set()
        if optimizer is not None:
            # the offload engine finalizes first (catch-up applied, page-outs landed); its streams read in place
            saved = optimizer.checkpoint_state(background=True)
            experts = set(saved.expert_steps)
            snapshot = dataclasses.replace(saved, dense=_DenseSnapshot(saved.dense), lr_history=list(saved.lr_history))
        tied = model.config.tie_word_embeddings
        state = {name: _host_copy(t) for name, t in model.state_dict().items()
                 if name not in experts and not (tied and name == "lm_head.weight")}
        dtype = next(model.parameters()).dtype

        def write_optimizer(out: Path) -> None:
            try:
                save_optimizer(snapshot, model, out, max_shard_bytes=max_shard_bytes, step_index=step)
            finally:
                self._store_free.set()  # the rest of the save does not read the store

        def job() -> Path:
            return write_checkpoint(
                run_dir, step, model.config, dtype=dtype, tensors=model_tensors(model, snapshot, state=state),
                write_optimizer=write_optimizer if snapshot is not None else None, trainer_state=trainer_state,
                recipe=recipe,
                max_shard_bytes=max_shard_bytes, keep_last=keep_last, tokenizer_dir=tokenizer_dir,
                progress=False)  # a second bar from this thread would garble the training bar

        if experts:
            self._store_free.clear()
        self._start(job)

    def _start(self, job: Callable[[], Path]) -> None:
        def run() -> None:
            try:
                self.last_saved = job()
            except BaseException as err:  # noqa: BLE001  (kept for the training thread, which raises it)
                self._error = err
            finally:
                self._store_free.set()

        # not a daemon: an interpreter that exits still lets the checkpoint finish
        self._thread = threading.Thread(target=run, name="moetrain-checkpoint-writer", daemon=False)
        self._thread.start()
