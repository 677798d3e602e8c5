"""Sharded checkpoints: Hugging Face-named model weights, optimizer state, configs and trainer state.

Layout of a run directory's ``checkpoints/``::

    step-<N>/
        model-0000i-of-0000n.safetensors     Hugging Face names (the family's layout), streamed shard by shard
        model.safetensors.index.json
        config.json                          the family's Hugging Face config (when the family can express it)
        moetrain_config.json                 the exact ModelConfig
        recipe.yaml                          the resolved recipe of the run (when run from the CLI)
        optimizer-0000i-of-0000n.safetensors optimizer tensors, named by their path in the state dict
        optimizer.safetensors.index.json
        optimizer.json                       the optimizer state's structure (non-tensor values inline)
        trainer_state.json                   step, epoch, tokens and Lightning's loop counters
    last                                     a text file holding the newest complete ``step-<N>`` name

A checkpoint is written as ``step-<N>.tmp/`` and renamed when complete; ``last`` is replaced by a
rename too. A crash at any moment leaves either the previous checkpoint or the new one, never a
half-written directory behind ``last``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from moetrain.config import ConfigError, ModelConfig
from moetrain.models import keymap
from moetrain.models.decoder import MoEForCausalLM
from moetrain.shards import iter_sharded, write_sharded

CHECKPOINTS_DIR = "checkpoints"
LAST_FILE = "last"
MOETRAIN_CONFIG = "moetrain_config.json"
HF_CONFIG = "config.json"
RECIPE_FILE = "recipe.yaml"
OPTIMIZER_PREFIX = "optimizer"
OPTIMIZER_STRUCTURE = "optimizer.json"
TRAINER_STATE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename (atomic on POSIX)."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- model
def model_tensors(model: MoEForCausalLM, optimizer: Any = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(Hugging Face name, tensor)`` for every saved tensor of ``model``.

    Parameters whose fp32 master copy lives in the optimizer (``optimizer.named_master_tensors()``)
    are taken from there; a tied ``lm_head.weight`` is left out, as transformers does.
    """
    masters: dict[str, torch.Tensor] = {}
    named_masters = getattr(optimizer, "named_master_tensors", None)
    if callable(named_masters):
        masters = dict(named_masters())
    family = model.config.family
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        yield keymap.to_hf_name(family, name), masters.get(name, tensor).detach()


def _hf_config(config: ModelConfig, dtype: torch.dtype) -> Optional[dict[str, Any]]:
    """The family's ``config.json``, or None when the converter is not available or refuses the config."""
    try:
        from moetrain.models.hf import config_to_hf
    except ImportError:
        return None
    try:
        return config_to_hf(config, torch_dtype=str(dtype).removeprefix("torch."))
    except ConfigError:
        return None  # e.g. a moetrain-only knob; moetrain_config.json still rebuilds the model


def load_model(ckpt_dir: str | Path, dtype: torch.dtype = torch.float32) -> MoEForCausalLM:
    """Rebuild the model saved in checkpoint directory ``ckpt_dir`` (strict: every tensor must be present)."""
    ckpt_dir = Path(ckpt_dir)
    config = ModelConfig.load(ckpt_dir / MOETRAIN_CONFIG)
    model = MoEForCausalLM(config)
    state = {keymap.from_hf_name(config.family, name): tensor for name, tensor in iter_sharded(ckpt_dir)}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing = sorted(set(model.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise ConfigError(f"{ckpt_dir}: checkpoint does not match its {MOETRAIN_CONFIG} (missing: "
                          f"{', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'})")
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


# ---------------------------------------------------------------------------------------------- optimizer
def _split_state(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able structure of ``obj`` with every tensor replaced by ``{"__tensor__": name}``.

    Dicts keep their key types (optimizer states are keyed by int) as ``{"__dict__": [[key, value], ...]}``.
    """
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _split_state(v, f"{path}.{k}" if path else str(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_split_state(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    return obj


def _join_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_split_state`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_join_state(v, tensors) for v in obj["__tuple__"])
        return {k: _join_state(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join_state(v, tensors) for v in obj]
    return obj


def save_optimizer_state(state: dict[str, Any], out_dir: Path, max_shard_bytes: int) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _split_state(state, "", tensors)
    write_sharded(tensors.items(), out_dir, prefix=OPTIMIZER_PREFIX, max_shard_bytes=max_shard_bytes)
    _write_text(out_dir / OPTIMIZER_STRUCTURE, json.dumps(structure) + "\n")


def load_optimizer_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """The optimizer state dict saved in ``ckpt_dir`` (tensors on the CPU)."""
    ckpt_dir = Path(ckpt_dir)
    structure = json.loads((ckpt_dir / OPTIMIZER_STRUCTURE).read_text())
    tensors = dict(iter_sharded(ckpt_dir, prefix=OPTIMIZER_PREFIX))
    return _join_state(structure, tensors)


# ---------------------------------------------------------------------------------------------- whole checkpoint
def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: MoEForCausalLM,
    optimizer: Any = None,
    trainer_state: Optional[dict[str, Any]] = None,
    recipe: Optional[str] = None,
    max_shard_bytes: int = 2 * 2**30,
) -> Path:
    """Write ``<run_dir>/checkpoints/step-<step>/`` and point ``checkpoints/last`` at it; returns the directory.

    ``optimizer`` is a :class:`~moetrain.training.optim.TrainOptimizer` (or None to skip its state).
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from a crash while writing
    tmp.mkdir(parents=True)
    write_sharded(model_tensors(model, optimizer), tmp, prefix="model", max_shard_bytes=max_shard_bytes)
    dtype = next(model.parameters()).dtype
    hf_config = _hf_config(model.config, dtype)
    if hf_config is not None:
        _write_text(tmp / HF_CONFIG, json.dumps(hf_config, indent=2) + "\n")
    model.config.save(tmp / MOETRAIN_CONFIG)
    if recipe is not None:
        _write_text(tmp / RECIPE_FILE, recipe)
    if optimizer is not None:
        save_optimizer_state(optimizer.state_dict(), tmp, max_shard_bytes)
    _write_text(tmp / TRAINER_STATE, json.dumps({"step": step, **(trainer_state or {})}, indent=2) + "\n")
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)  # the same step saved again (a re-run into the same directory)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_text(root / LAST_FILE, final.name + "\n")
    return final


def resolve_checkpoint(path: str | Path, run_dir: str | Path) -> Path:
    """The checkpoint directory named by ``--ckpt_path``: ``last`` reads ``<run_dir>/checkpoints/last``.

    Raises:
        ConfigError: nothing to resume from, or the directory is incomplete.
    """
    if str(path) == "last":
        pointer = Path(run_dir) / CHECKPOINTS_DIR / LAST_FILE
        if not pointer.is_file():
            raise ConfigError(f"--ckpt_path=last: {pointer} not found; no complete checkpoint in run directory "
                              f"{run_dir} (check --trainer.default_root_dir, or drop --ckpt_path to start fresh)")
        ckpt = pointer.parent / pointer.read_text().strip()
    else:
        ckpt = Path(path)
    if not (ckpt / MOETRAIN_CONFIG).is_file():
        raise ConfigError(f"--ckpt_path: {ckpt} is not a complete moetrain checkpoint (no {MOETRAIN_CONFIG}); "
                          "pass a checkpoints/step-<N> directory or 'last'")
    return ckpt


def _trainer_state(trainer: L.Trainer, tokens: int) -> dict[str, Any]:
    state: dict[str, Any] = {"global_step": trainer.global_step, "epoch": trainer.current_epoch, "tokens": tokens}
    try:  # Lightning's loop counters; a later resume restores them exactly
        state["fit_loop"] = json.loads(json.dumps(trainer.fit_loop.state_dict()))
    except (TypeError, ValueError):
        pass
    return state


class CheckpointCallback(L.Callback):
    """Save a checkpoint every ``every_n_steps`` optimizer steps and at the end of training (``checkpoint:``)."""

    def __init__(self, every_n_steps: int = 0, max_shard_mb: int = 2048, save_final: bool = True) -> None:
        """
        Args:
            every_n_steps: save every this many optimizer steps (0: only at the end).
            max_shard_mb: size of one safetensors shard in MiB.
            save_final: save when training ends.
        """
        if every_n_steps < 0 or max_shard_mb <= 0:
            raise ConfigError("checkpoint.every_n_steps must be >= 0 and checkpoint.max_shard_mb > 0")
        self.every_n_steps = every_n_steps
        self.max_shard_bytes = max_shard_mb * 2**20
        self.save_final = save_final
        self.saved_step = -1
        self._tokens = 0
        self._seen_step = -1

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self.saved_step or step == 0 or not trainer.is_global_zero:
            return
        save_checkpoint(
            trainer.default_root_dir, step, pl_module.model, getattr(pl_module, "train_optimizer", None),
            trainer_state=_trainer_state(trainer, self._tokens), recipe=getattr(pl_module, "resolved_recipe", None),
            max_shard_bytes=self.max_shard_bytes,
        )
        self.saved_step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stats = getattr(pl_module, "last_step", None)
        if stats is None or stats.step == self._seen_step:
            return
        self._seen_step = stats.step
        self._tokens += stats.tokens
        if self.every_n_steps and stats.step % self.every_n_steps == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_final:
            self._save(trainer, pl_module)
