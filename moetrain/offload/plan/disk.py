"""The disk a run fills, and the host memory its files cost to read and write.

The disk holds the ``init_from`` directory (its safetensors, or the preset in bf16 before the download), the
NVMe swap, and the checkpoints (:func:`checkpoint_bytes`: fp32 weights and the AdamW moments as stored) that
exist at once: a new checkpoint is complete before the oldest beyond ``keep_last`` is deleted
(:func:`checkpoints_on_disk`). They are one tier, ``disk``, unless the swap folder is on another filesystem
(then it is the ``nvme`` tier). Reading ``init_from`` holds one shard in host memory at a time (the largest shard
of the directory; before the download :data:`HF_SHARD_BYTES`, at most the model in bf16); a checkpoint save
about two shards (``max_shard_mb``).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from moetrain.config import ModelConfig
from moetrain.offload.config import OffloadPlan, OffloadSettings
from moetrain.offload.plan.assumptions import LOAD_BYTES_PER_PARAM
from moetrain.offload.state_format import state_bytes_per_param

HF_SHARD_BYTES = 5 * 10**9
"""Size of one safetensors shard of a Hugging Face download (transformers' default ``max_shard_size``, 5 GB):
what reading ``init_from`` holds in host memory at a time when the directory is not here to measure."""
SAVE_SHARDS_IN_FLIGHT = 2
"""Shards a checkpoint save holds in host memory: the shard's tensors and safetensors' serialisation of them
(training/checkpoint.py)."""
DEFAULT_SHARD_MB = 2048
"""``checkpoint.max_shard_mb`` when a recipe does not set it (``CheckpointCallback``'s default)."""


@dataclass(frozen=True)
class Storage:
    """What a run puts on disk besides the swap, and what reading and writing it costs in host memory.

    Attributes:
        model_dir_bytes: bytes the ``init_from`` directory needs on the run's disk (0: none, or already in its
            used space); model_dir_what: its row's text.
        load_shard_bytes: host memory of reading ``init_from`` (one shard at a time).
        checkpoints: checkpoints on disk at once (0: none counted); checkpoints_what: why that many.
        max_shard_bytes: one checkpoint shard (``checkpoint.max_shard_mb``); async_save: ``checkpoint.async``.
        swap_separate: the swap folder is on another filesystem than the run directory, with ``swap_free``
            bytes free (None: unknown); otherwise the swap counts on the run's disk.
    """

    model_dir_bytes: int = 0
    model_dir_what: str = ""
    load_shard_bytes: int = HF_SHARD_BYTES
    checkpoints: int = 0
    checkpoints_what: str = ""
    max_shard_bytes: int = DEFAULT_SHARD_MB * 2**20
    async_save: bool = False
    swap_separate: bool = False
    swap_free: Optional[int] = None



def checkpoint_bytes(dense: int, expert: int, *, offload: OffloadPlan, trained_expert: Optional[int] = None,
                     trained_dense: Optional[int] = None) -> int:
    """Bytes of one checkpoint's tensors (training/checkpoint.py, training/optimizer_state.py): every weight in
    fp32 (the offloaded experts' masters are decoded to fp32 whatever their stored format), the dense AdamW
    moments in fp32 (8 B/param), and the routed experts' moments as the store keeps them (fp32 8 B, bf16 4 B,
    int8 2 B plus one fp32 scale a block of each). The configs, trainer state and tokenizer copy are kilobytes
    to megabytes and are left out. ``trained_expert`` / ``trained_dense``: routed-expert / dense parameters that
    train (None: all); frozen ones have weights in a checkpoint but no moments."""
    if offload.tier == "none":
        moments = 8.0
    else:
        moments = state_bytes_per_param("fp32", offload.moments, offload.quant_block) - 4
    trained = expert if trained_expert is None else trained_expert
    dense_moments = 8 * (dense if trained_dense is None else trained_dense)
    return LOAD_BYTES_PER_PARAM * (dense + expert) + dense_moments + math.ceil(moments * trained)


def checkpoints_on_disk(every_n_steps: int, max_steps: Optional[int], *, save_final: bool,
                        keep_last: int) -> tuple[int, str]:
    """(checkpoints on disk at once, why) for a run's ``checkpoint`` section and ``trainer.max_steps``.

    A save writes the new checkpoint completely before the ones older than the ``keep_last`` newest are deleted
    (a process killed at any moment leaves a complete one), so rotation keeps ``keep_last + 1`` at the peak;
    without rotation (``keep_last: 0``) every save of the run stays: one every ``every_n_steps`` steps and the
    final one (skipped when the last step saved already). The save on a signal ends the run, so it is one of
    these.
    """
    bounded = max_steps is not None and max_steps > 0
    periodic = max_steps // every_n_steps if every_n_steps and bounded else 0
    final = save_final and not (periodic and max_steps % every_n_steps == 0)
    saves = periodic + final
    schedule = " and ".join(([f"every {every_n_steps} of {max_steps} steps"] if periodic else [])
                            + (["the final one"] if final else []))
    if every_n_steps and not bounded:
        if keep_last:
            return keep_last + 1, (f"every {every_n_steps} steps, keep_last {keep_last}: the newest is written "
                                   "before the oldest goes")
        return 1, (f"every {every_n_steps} steps of an unbounded run (trainer.max_steps) and keep_last 0: every one "
                   "stays, counted once here; set checkpoint.keep_last")
    if keep_last and saves > keep_last:
        return keep_last + 1, (f"{saves} saves ({schedule}), keep_last {keep_last}: the newest is written before "
                               "the oldest goes")
    if saves == 0:
        return 0, "none (every_n_steps 0, save_final false)"
    if saves == 1:
        return 1, f"1 saved ({schedule})"
    return saves, f"{saves} saved ({schedule}), " + (f"keep_last {keep_last}" if keep_last else "keep_last 0: all kept")



def search_storage(model_config: ModelConfig, streamed_load: bool = True) -> Storage:
    """The disk of a fine-tune in the largest-preset search: the model downloaded from Hugging Face (bf16) when it
    starts from ``init_from`` (``streamed_load``), and one checkpoint (``save_final``, the default shards)."""
    total = model_config.param_counts()["total"]
    model_dir = ("model directory (init_from: the preset in bf16, as downloaded)", 2 * total) if streamed_load \
        else ("", 0)
    return Storage(model_dir_what=model_dir[0], model_dir_bytes=model_dir[1], checkpoints=1,
                   checkpoints_what="the final one")



CHECKPOINT_DEFAULTS = {"every_n_steps": 0, "max_shard_mb": DEFAULT_SHARD_MB, "save_final": True, "keep_last": 0,
                       "async": False}
"""The ``checkpoint`` section's defaults (``CheckpointCallback``'s signature; a test keeps them equal)."""


def _existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (a folder the run has not made yet is made there)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _same_filesystem(a: Path, b: Path) -> bool:
    return os.stat(_existing(a)).st_dev == os.stat(_existing(b)).st_dev


def recipe_storage(recipe: dict[str, Any], model_config: ModelConfig,
                   disk_free: Optional[int] = None) -> tuple[Storage, Optional[int]]:
    """(what a recipe's run puts on disk, the free bytes of the run's disk).

    The ``init_from`` directory counts its safetensors when it is here, and the preset in bf16 (what a Hugging
    Face download holds) when it is not; the checkpoints as :func:`checkpoints_on_disk` counts them, from the
    ``checkpoint`` section and ``trainer.max_steps``. With ``disk_free`` given (``--disk-gb``) it is one disk, free
    before the download, that holds all of it. Measured here instead, it is the filesystem of the run directory
    (``trainer.default_root_dir``, or the nearest folder above it that exists): an ``init_from`` directory already
    on it is in its used space and is not counted again, and a swap folder (``model.offload.nvme.path``) on
    another filesystem is the separate ``nvme`` tier, with that filesystem's free space.
    """
    model = recipe.get("model") or {}
    trainer = recipe.get("trainer") or {}
    section = {**CHECKPOINT_DEFAULTS, **(recipe.get("checkpoint") or {})}
    kept, why = checkpoints_on_disk(int(section["every_n_steps"]), trainer.get("max_steps", -1),
                                    save_final=bool(section["save_final"]), keep_last=int(section["keep_last"]))
    run_dir = Path(trainer.get("default_root_dir") or ".")
    measured = disk_free is None
    init_from, model_dir, shard = model.get("init_from"), ("", 0), HF_SHARD_BYTES
    if init_from and Path(init_from).is_dir():
        sizes = [f.stat().st_size for f in Path(init_from).rglob("*.safetensors")]
        shard = max(sizes, default=HF_SHARD_BYTES)
        if not measured:
            model_dir = ("init_from directory (its safetensors)", sum(sizes))
        elif _same_filesystem(Path(init_from), run_dir):
            model_dir = ("init_from directory (on this disk already: used space)", 0)
        else:
            model_dir = ("init_from directory (on another filesystem)", 0)
    elif init_from:
        download = 2 * model_config.param_counts()["total"]
        shard = min(HF_SHARD_BYTES, download)
        if measured and not _same_filesystem(Path(init_from), run_dir):
            model_dir = ("init_from directory, not here yet (on another filesystem)", 0)
        else:
            model_dir = ("init_from directory, not here yet (the preset in bf16)", download)
    swap = OffloadSettings.from_dict(model.get("offload")).nvme.path
    separate = bool(measured and swap and not _same_filesystem(Path(swap), run_dir))
    if measured:
        disk_free = shutil.disk_usage(_existing(run_dir)).free
    storage = Storage(model_dir_bytes=model_dir[1], model_dir_what=model_dir[0], load_shard_bytes=shard,
                      checkpoints=kept, checkpoints_what=why, max_shard_bytes=int(section["max_shard_mb"]) * 2**20,
                      async_save=bool(section["async"]), swap_separate=separate,
                      swap_free=shutil.disk_usage(_existing(Path(swap))).free if separate else None)
    return storage, disk_free
