"""The trainer state of a checkpoint (``trainer_state.json``): what an exact resume needs besides weights
and optimizer state.

Saved at an optimizer-step boundary (so the accumulation position is always 0 micro-batches)::

    step, global_step       optimizer steps done; the schedule continues from here
    epoch                   Lightning's epoch counter
    tokens                  input tokens trained on so far, all ranks (the module's ``tokens_seen``: the one
                            count that metrics.jsonl continues from)
    data                    {"epoch", "batches_in_epoch", "micro_batch_size"}: the data-loader position
    accumulation            {"micro_batches": 0, "accumulate_grad_batches"}
    rng                     torch (CPU and every CUDA device), Python and NumPy generator states
    routing                 the offload engine's per-expert routing frequencies (its eviction order)
    callbacks               ``state_dict()`` of every callback that has one (Lightning's own mechanism):
                            the experiment logger's run id
    loggers                 {logger class: run id/version} so that a logger can continue its run
    fit_loop                Lightning's loop counters, for inspection

Restoring (:func:`restore`) happens in the module's ``on_train_start``, after Lightning has built the
data loader and before the first batch is drawn: the step and epoch counters are set, the sampler is
told how many rows of the epoch were consumed (see :mod:`moetrain.training.sampler`), RNG states and
callback states are put back.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

TRAINER_STATE = "trainer_state.json"


# ---------------------------------------------------------------------------------------------- RNG
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from, as JSON."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        cuda = [_unb64(s) for s in state["cuda"]]
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------- capture
def _json_safe(value: Any) -> Optional[Any]:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return None


def _routing_state(pl_module: L.LightningModule) -> dict[str, dict[str, list[float]]]:
    optimizer = pl_module.train_optimizer
    frequency = optimizer.routing_frequency() if optimizer is not None else {}
    if not frequency:  # an optimizer that keeps none (plain AdamW, the multi-rank optimizer)
        return {}
    return {"expert_frequency": {str(layer): values for layer, values in frequency.items()}}


def capture(trainer: L.Trainer, pl_module: L.LightningModule, *, epoch: int, batches_in_epoch: int) -> dict[str, Any]:
    """The trainer state at the current optimizer-step boundary.

    The token count is the module's own (``tokens_seen``, advanced inside the optimizer step), so it is the
    same whichever callback saves and in whatever order the callbacks run.
    """
    datamodule = getattr(trainer, "datamodule", None)
    callbacks = {}
    for cb in trainer.callbacks:
        state = _json_safe(cb.state_dict())
        if state:
            callbacks[cb.state_key] = state
    return {
        "step": trainer.global_step,
        "global_step": trainer.global_step,
        "epoch": epoch,
        "tokens": int(getattr(pl_module, "tokens_seen", 0)),
        "data": {"epoch": epoch, "batches_in_epoch": batches_in_epoch,
                 "micro_batch_size": getattr(datamodule, "micro_batch_size", None)},
        "accumulation": {"micro_batches": int(pl_module.micro_batch),
                         "accumulate_grad_batches": int(getattr(pl_module, "accumulate_grad_batches", 1))},
        "rng": rng_state(),
        "routing": _routing_state(pl_module),
        "callbacks": callbacks,
        "loggers": {type(lg).__name__: _json_safe(lg.version) for lg in trainer.loggers},
        "fit_loop": _json_safe(trainer.fit_loop.state_dict()),
    }


def read(ckpt_dir: str | Path) -> dict[str, Any]:
    from moetrain.shards import ShardError

    path = Path(ckpt_dir) / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path} is missing; the checkpoint is incomplete, resume from an earlier one") from None
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: not valid JSON (line {err.lineno}: {err.msg}); the checkpoint is corrupted, "
                         "resume from an earlier one") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ShardError(f"{path}: no 'step' field; the checkpoint is corrupted, resume from an earlier one")
    return state


# ---------------------------------------------------------------------------------------------- restore
def _set_progress(progress: Any, value: int) -> None:
    for tracker in (progress.total, progress.current):
        tracker.ready = tracker.started = tracker.processed = tracker.completed = value


def _resumable_samplers(trainer: L.Trainer) -> list[Any]:
    loaders = trainer.train_dataloader
    if loaders is None:
        return []
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    return [getattr(dl, "sampler", None) for dl in loaders]


def restore(trainer: L.Trainer, pl_module: L.LightningModule, state: dict[str, Any]) -> None:
    """Put the saved counters, data position, RNG and callback states back (call in ``on_train_start``)."""
    step = int(state["step"])
    loop = trainer.fit_loop
    # Lightning has no public setter for global_step; under manual optimization it is this counter
    total = loop.epoch_loop.manual_optimization.optim_step_progress.total
    total.ready = total.completed = step
    loop.epoch_loop._batches_that_stepped = step  # the step axis of Lightning loggers
    data = state.get("data") or {"epoch": int(state.get("epoch", 0)), "batches_in_epoch": 0}
    epoch, batches = int(data["epoch"]), int(data["batches_in_epoch"])
    if batches and batches >= trainer.num_training_batches:
        epoch, batches = epoch + 1, 0  # saved on the last batch of an epoch
    _set_progress(loop.epoch_progress, epoch)
    mbs = data.get("micro_batch_size")
    if batches:
        samplers = [s for s in _resumable_samplers(trainer) if hasattr(s, "resume_at")]
        if not samplers:
            rank_zero_warn("the training data loader cannot resume mid-epoch; the resumed run restarts the "
                           f"epoch from its first batch (checkpoint position: batch {batches} of epoch {epoch})")
        for sampler in samplers:
            sampler.resume_at(epoch, batches * int(mbs))
    for cb in trainer.callbacks:
        saved = (state.get("callbacks") or {}).get(cb.state_key)
        if saved is not None:
            cb.load_state_dict(saved)
    for cb in trainer.callbacks:
        if hasattr(cb, "resume_position"):
            cb.resume_position(epoch, batches)
    pl_module.tokens_seen = int(state.get("tokens", 0))
    routing = (state.get("routing") or {}).get("expert_frequency")
    optimizer = pl_module.train_optimizer
    if routing and optimizer is not None:
        optimizer.load_routing_frequency({int(layer): values for layer, values in routing.items() if layer.isdigit()})
    if state.get("rng"):
        set_rng_state(state["rng"])
