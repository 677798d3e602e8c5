"""Optimizer state on disk, keyed by parameter name, the same for every tier.

A checkpoint holds, for every trainable parameter that has AdamW state::

    optimizer-0000i-of-0000n.safetensors   "<param>.exp_avg", "<param>.exp_avg_sq"  (fp32, the parameter's shape;
                                           offloaded experts with compressed moments: bf16, or uint8 codes
                                           plus "<param>.exp_avg.absmax" block scales)
    optimizer.safetensors.index.json
    optimizer.json                          {"format", "steps": {param: AdamW step count}, "step_index",
                                             "lr_history"}

``<param>`` is the model's internal parameter name (``model.layers.0.mlp.experts.3.up_proj.weight``).
Because nothing depends on how the optimizer groups or pages its parameters, a checkpoint written with
``tier: none`` (``torch.optim.AdamW`` over every parameter) resumes under ``tier: cpu`` or ``nvme``
(dense AdamW plus paged expert records) and back. A parameter without state (an expert that never got
a token) is absent or has step 0; both mean what ``torch.optim.AdamW`` means by no state.

Saving streams what the optimizer's :meth:`~moetrain.optim.TrainOptimizer.checkpoint_state` gives: dense
moments are referenced where they live, expert moments come one record at a time from the offload engine's
store. Loading hands an :class:`OptimizerFiles` to the optimizer's
:meth:`~moetrain.optim.TrainOptimizer.load_checkpoint_state`, which reads the dense part into its dense AdamW
and streams the expert part, shard by shard, into the expert store (pinned memory or swap files), never
holding all of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from moetrain.atomic import write_text
from moetrain.config import ConfigError
from moetrain.optim import CheckpointState, TrainOptimizer
from moetrain.shards import ShardError, iter_shard_tensors, read_weight_map, write_sharded

OPTIMIZER_PREFIX = "optimizer"
OPTIMIZER_JSON = "optimizer.json"
FORMAT = "moetrain-adamw-by-name-v1"
MOMENTS = ("exp_avg", "exp_avg_sq")


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------- save
def save_optimizer(saved: CheckpointState, model: nn.Module, out_dir: Path, *, max_shard_bytes: int,
                   step_index: int) -> None:
    """Write an optimizer's state ``saved`` (:meth:`~moetrain.optim.TrainOptimizer.checkpoint_state`) into
    ``out_dir`` in the by-name format (tensors stream shard by shard)."""
    dense = saved.dense
    names = _param_names(model)
    steps: dict[str, int] = {}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for group in dense.param_groups:
            for p in group["params"]:
                state = dense.state.get(p)
                if not state:
                    continue
                name = names[id(p)]
                steps[name] = int(state["step"])
                for part in MOMENTS:
                    yield f"{name}.{part}", state[part].detach()
        steps.update(saved.expert_steps)
        yield from saved.named_optimizer_tensors()

    write_sharded(tensors(), out_dir, prefix=OPTIMIZER_PREFIX, max_shard_bytes=max_shard_bytes)
    meta = {"format": FORMAT, "step_index": step_index, "steps": dict(sorted(steps.items())),
            "lr_history": list(saved.lr_history)}
    write_text(out_dir / OPTIMIZER_JSON, json.dumps(meta) + "\n")


# ---------------------------------------------------------------------------------------------- load
def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / OPTIMIZER_JSON
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path} is missing; the checkpoint holds no optimizer state. Resume from another "
                         "checkpoint, or start from its weights with model.init_from instead") from None
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: not valid JSON (line {err.lineno}: {err.msg}); the checkpoint is corrupted, "
                         "resume from an earlier one") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ShardError(f"{path}: not a {FORMAT} optimizer state (format {meta.get('format')!r}); it was written "
                         "by another version, start from its weights with model.init_from instead")
    return meta


def iter_named(
    ckpt_dir: Path, wanted: Iterable[str], prefix: str = OPTIMIZER_PREFIX
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors of ``wanted`` that the shard set holds, one shard open at a time."""
    try:
        for _, name, tensor in iter_shard_tensors(ckpt_dir, prefix, names=wanted):
            yield name, tensor
    except ShardError as err:
        raise ShardError(f"{err}; resume from an earlier checkpoint") from None


def _check_shape(ckpt_dir: Path, name: str, tensor: torch.Tensor, shape: torch.Size) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ShardError(f"{ckpt_dir}: optimizer tensor {name!r} has shape {tuple(tensor.shape)} but the model's "
                         f"parameter has {tuple(shape)}; the checkpoint is of another model shape")


def _load_torch_adamw(dense: torch.optim.Optimizer, model: nn.Module, ckpt_dir: Path, steps: dict[str, int]) -> None:
    """Rebuild ``dense``'s state from the by-name tensors of its parameters."""
    names = _param_names(model)
    params = {names[id(p)]: p for group in dense.param_groups for p in group["params"]}
    wanted = [f"{n}.{part}" for n in params if steps.get(n, 0) > 0 for part in MOMENTS]
    loaded = dict(iter_named(ckpt_dir, wanted))
    current = dense.state_dict()
    index = {names[id(p)]: i for i, p in enumerate(p for g in dense.param_groups for p in g["params"])}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name in params:
        if steps.get(name, 0) == 0:
            continue  # no state, as torch.optim.AdamW has before a parameter's first step
        entry = {"step": torch.tensor(float(steps[name]), dtype=torch.float32)}
        for part in MOMENTS:
            key = f"{name}.{part}"
            if key not in loaded:
                raise ShardError(f"{ckpt_dir}: optimizer state of {name!r} (step {steps[name]}) lacks {key!r} in "
                                 "optimizer.safetensors.index.json; the checkpoint is incomplete, resume from an "
                                 "earlier one")
            _check_shape(ckpt_dir, key, loaded[key], params[name].shape)
            entry[part] = loaded[key]
        state[index[name]] = entry
    dense.load_state_dict({"state": state, "param_groups": current["param_groups"]})


class OptimizerFiles:
    """The optimizer state of checkpoint ``ckpt_dir`` (:class:`~moetrain.optim.SavedOptimizerState`), read on demand:
    an optimizer's :meth:`~moetrain.optim.TrainOptimizer.load_checkpoint_state` reads only the tensors of the
    parameters it steps, one shard open at a time, checked against ``model``'s shapes.

    Raises (while read):
        ShardError: missing, truncated or mis-shaped state (names the file and tensor).
    """

    def __init__(self, model: nn.Module, ckpt_dir: str | Path, meta: Optional[dict[str, Any]] = None) -> None:
        self.model = model
        self.ckpt_dir = Path(ckpt_dir)
        meta = read_meta(self.ckpt_dir) if meta is None else meta
        self.steps: dict[str, int] = {k: int(v) for k, v in meta["steps"].items()}
        self.step_index = int(meta["step_index"])
        history = list(meta.get("lr_history") or [])
        # from tier none there is no history; every expert is caught up to step_index, so none is read
        self.lr_history = history + [0.0] * (self.step_index - len(history))

    def load_into(self, dense: torch.optim.Optimizer) -> None:
        _load_torch_adamw(dense, self.model, self.ckpt_dir, self.steps)

    def tensors(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        shapes = dict(self.model.named_parameters())
        # 8-bit moments come with their per-block scales (``<param>.<moment>.absmax``), shaped by blocks
        wanted = [f"{n}.{part}{scale}" for n in names for part in MOMENTS for scale in ("", ".absmax")]
        for key, tensor in iter_named(self.ckpt_dir, wanted):
            if not key.endswith(".absmax"):
                _check_shape(self.ckpt_dir, key, tensor, shapes[key.rsplit(".", 1)[0]].shape)
            yield key, tensor


def load_optimizer(optimizer: TrainOptimizer, model: nn.Module, ckpt_dir: str | Path) -> None:
    """Restore ``optimizer`` (any tier) from the by-name state in ``ckpt_dir``.

    Raises:
        ShardError: missing, truncated or mis-shaped state (names the file and tensor).
        ConfigError: the state names parameters this model does not have.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    unknown = sorted(set(meta["steps"]) - set(dict(model.named_parameters())))
    if unknown:
        raise ConfigError(f"{ckpt_dir / OPTIMIZER_JSON}: optimizer state for {len(unknown)} parameter(s) this model "
                          f"does not have ({', '.join(unknown[:3])}); resume with the recipe the checkpoint was "
                          "trained with (its recipe.yaml)")
    optimizer.load_checkpoint_state(OptimizerFiles(model, ckpt_dir, meta))


def read_optimizer_state(ckpt_dir: str | Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """``({param: step}, {"<param>.exp_avg" | "<param>.exp_avg_sq": tensor})`` of a checkpoint (all in memory;
    for tests and inspection)."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    names = read_weight_map(ckpt_dir, OPTIMIZER_PREFIX)
    return {k: int(v) for k, v in meta["steps"].items()}, dict(iter_named(ckpt_dir, names))
