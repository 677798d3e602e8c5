"""Checkpoints written by every rank at once, and read back at any world size.

Every rank writes the tensors it is the one owner of, as its own shard set inside the common
``step-<N>.tmp/`` directory; rank 0 then merges the per-rank indices into the usual
``model.safetensors.index.json`` and ``optimizer.safetensors.index.json`` and writes the rest (configs,
``optimizer.json`` with every rank's step counts, ``trainer_state.json`` last) before the rename::

    model-rank00000-00001-of-00001.safetensors       rank 0: dense weights + its experts' fp32 masters
    model-rank00001-00001-of-00001.safetensors       rank 1: its experts' fp32 masters
    optimizer-rank0000r-...                          the same split of the AdamW moments
    model.safetensors.index.json                     one index naming every tensor's file

Who writes what: dense tensors (replicated) come from world rank 0; expert ``e`` comes from the one
rank that counts it in the gradient norm (:meth:`~moetrain.parallel.layout.ParallelLayout.counts_norm`:
its state owner when the state is partitioned). The result is an ordinary moetrain checkpoint:
``load_model``, ``export`` and a single-process resume read it unchanged (2 -> 1), and a multi-rank
resume reads from it by name only what each rank holds (1 -> 2, or another expert-parallel size).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from moetrain.atomic import fsync_dir, write_text
from moetrain.models import keymap
from moetrain.optim import CheckpointState, TrainOptimizer
from moetrain.parallel.layout import ParallelLayout
from moetrain.shards import write_sharded
from moetrain.training.checkpoint import (
    CHECKPOINTS_DIR,
    LAST_FILE,
    rotate,
    step_dir_name,
    write_side_files,
)
from moetrain.training.optimizer_state import (
    FORMAT,
    MOMENTS,
    OPTIMIZER_JSON,
    OPTIMIZER_PREFIX,
    OptimizerFiles,
    _param_names,
)

_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def expert_of(name: str) -> Optional[int]:
    """The routed expert index in an internal parameter name, or None for a dense parameter."""
    match = _EXPERT.search(name)
    return None if match is None else int(match.group(1))


def _writes(layout: ParallelLayout, name: str) -> bool:
    """Whether this rank writes tensor ``name`` (exactly one rank writes each)."""
    e = expert_of(name)
    return layout.rank == 0 if e is None else (e in layout.local_experts and layout.counts_norm(e))


# ---------------------------------------------------------------------------------------------- this rank's share
def _model_share(model: nn.Module, saved: CheckpointState,
                 layout: ParallelLayout) -> Iterator[tuple[str, torch.Tensor]]:
    family = model.config.family
    done: set[str] = set()
    for name, tensor in saved.named_master_tensors():  # fp32 masters of the experts whose state this rank holds
        done.add(name)
        if _writes(layout, name):
            yield keymap.to_hf_name(family, name), tensor
    for name, tensor in model.state_dict().items():
        if name in done or (model.config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        if _writes(layout, name):
            yield keymap.to_hf_name(family, name), tensor.detach()


def _optimizer_share(model: nn.Module, saved: CheckpointState, layout: ParallelLayout,
                     steps: dict[str, int]) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's moments by parameter name; fills ``steps`` with their AdamW step counts."""
    dense = saved.dense
    names = _param_names(model)
    for group in dense.param_groups:
        for p in group["params"]:
            state = dense.state.get(p)
            name = names[id(p)]
            if not state or not _writes(layout, name):
                continue
            steps[name] = int(state["step"])
            for part in MOMENTS:
                yield f"{name}.{part}", state[part].detach()
    steps.update({n: s for n, s in saved.expert_steps.items() if _writes(layout, n)})
    for key, tensor in saved.named_optimizer_tensors():
        if _writes(layout, key):
            yield key, tensor


# ---------------------------------------------------------------------------------------------- save
def save_checkpoint_distributed(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    *,
    optimizer: TrainOptimizer,
    layout: ParallelLayout,
    trainer_state: Optional[dict[str, Any]] = None,
    recipe: Optional[str] = None,
    max_shard_bytes: int = 2 * 2**30,
    keep_last: int = 0,
    tokenizer_dir: Optional[str | Path] = None,
) -> Path:
    """Collective: every rank writes its share of ``<run_dir>/checkpoints/step-<step>/``; returns the directory.

    Same layout and crash safety as :func:`moetrain.training.checkpoint.save_checkpoint` (``step-<N>.tmp``,
    renamed by rank 0 once every rank's files and the merged indices are written, then ``last``).
    ``optimizer`` is a :class:`~moetrain.parallel.optimizer.ParallelOptimizer`.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    final, tmp = root / step_dir_name(step), root / (step_dir_name(step) + ".tmp")
    if layout.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step-*.tmp"):
            shutil.rmtree(stale)
        tmp.mkdir()
    dist.barrier()
    tag = f"rank{layout.rank:05d}"
    saved = optimizer.checkpoint_state()
    model_map = write_sharded(_model_share(model, saved, layout), tmp, prefix=f"model-{tag}",
                              max_shard_bytes=max_shard_bytes)
    steps: dict[str, int] = {}
    optim_map = write_sharded(_optimizer_share(model, saved, layout, steps), tmp,
                              prefix=f"{OPTIMIZER_PREFIX}-{tag}", max_shard_bytes=max_shard_bytes)
    shares: list[Any] = [None] * layout.world
    dist.all_gather_object(shares, (model_map, optim_map, steps))
    if layout.rank == 0:
        for prefix, which in (("model", 0), (OPTIMIZER_PREFIX, 1)):
            merged: dict[str, str] = {}
            for rank, share in enumerate(shares):
                merged.update(share[which])
                (tmp / f"{prefix}-rank{rank:05d}.safetensors.index.json").unlink()
            total = sum((tmp / f).stat().st_size for f in set(merged.values()))
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(merged.items()))}
            write_text(tmp / f"{prefix}.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        all_steps = {k: v for share in shares for k, v in share[2].items()}
        meta = {"format": FORMAT, "step_index": step, "steps": dict(sorted(all_steps.items())),
                "lr_history": list(saved.lr_history)}
        write_text(tmp / OPTIMIZER_JSON, json.dumps(meta) + "\n")
        _write_rest(tmp, model, step, _global_position(trainer_state, layout.world), recipe, tokenizer_dir)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)
        write_text(root / LAST_FILE, final.name + "\n")
        fsync_dir(root)
        if keep_last > 0:
            rotate(root, keep_last)
    dist.barrier()  # no rank goes on (or reads ``last``) before the checkpoint is complete
    return final


def _global_position(trainer_state: Optional[dict[str, Any]], world: int) -> Optional[dict[str, Any]]:
    """The data position in rows of the shared order: a micro-batch of every rank together is one global
    micro-batch of ``world`` times the rows, so a resume at any world size skips the rows really consumed."""
    if not trainer_state or not isinstance(trainer_state.get("data"), dict):
        return trainer_state
    data = dict(trainer_state["data"])
    if data.get("micro_batch_size"):
        data["micro_batch_size"] = int(data["micro_batch_size"]) * world
    data["world_size"] = world
    return {**trainer_state, "data": data}


def _write_rest(tmp: Path, model: nn.Module, step: int, trainer_state: Optional[dict[str, Any]],
                recipe: Optional[str], tokenizer_dir: Optional[str | Path]) -> None:
    write_side_files(tmp, model.config, next(model.parameters()).dtype, step=step, trainer_state=trainer_state,
                     recipe=recipe, tokenizer_dir=tokenizer_dir)


# ---------------------------------------------------------------------------------------------- load
def load_optimizer_partitioned(optimizer: TrainOptimizer, model: nn.Module, ckpt_dir: str | Path) -> None:
    """Restore a :class:`~moetrain.parallel.optimizer.ParallelOptimizer` from a checkpoint written at any
    world size: each rank reads, by name, the moments of the parameters whose state it holds.

    Raises:
        ShardError: missing, truncated or mis-shaped state (names the file and tensor).
    """
    # the dense AdamW reads the parameters of its groups only, the offload engine the experts whose state this
    # rank keeps: a filtered read
    optimizer.load_checkpoint_state(OptimizerFiles(model, ckpt_dir))
