"""Sharded checkpoints: Hugging Face-named model weights, optimizer state, configs and trainer state.

Layout of a run directory's ``checkpoints/``::

    step-<N>/
        model-0000i-of-0000n.safetensors     Hugging Face names (the family's layout), fp32 master values
        model.safetensors.index.json
        config.json                          the family's Hugging Face config (when the family can express it)
        moetrain_config.json                 the exact ModelConfig
        recipe.yaml                          the resolved recipe of the run (when run from the CLI)
        optimizer-0000i-of-0000n.safetensors AdamW moments by parameter name (see optimizer_state)
        optimizer.safetensors.index.json
        optimizer.json                       per-parameter step counts, the offload engine's lr history
        trainer_state.json                   step, data position, RNG, callback states (see trainer_state)
        tokenizer files                      copied from data.tokenizer, so that an export is complete
    last                                     a text file holding the newest complete ``step-<N>`` name

Saving streams: model tensors are taken where they live (GPU, pinned host, NVMe through the offload
engine's ``named_master_tensors``) and a shard is written as soon as it is full, so a save adds about
two shards to host memory (the shard's tensors and safetensors' serialisation of them).

A checkpoint is written as ``step-<N>.tmp/``, every file fsynced, the directory renamed to ``step-<N>``
and fsynced; only then is ``last`` replaced (by a rename too), and older checkpoints beyond
``keep_last`` are deleted. A process killed at any moment leaves ``last`` naming a complete checkpoint.

Loading checks first (:func:`verify_checkpoint`): every shard's safetensors header is read and its
length compared with the file, every tensor named in an index must be in its shard, the model config
must match. A failure names the file or tensor and says what to do; nothing is written.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from moetrain.atomic import fsync_dir, write_text
from moetrain.config import ConfigError, ModelConfig
from moetrain.models import keymap
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf import CHECKPOINTS_DIR, HF_CONFIG, LAST_FILE, MOETRAIN_CONFIG
from moetrain.optim import CheckpointState, TrainOptimizer
from moetrain.progress import tensor_progress
from moetrain.shards import ShardError, read_weight_map, write_sharded
from moetrain.training import trainer_state
from moetrain.training.optimizer_state import OPTIMIZER_PREFIX, save_optimizer

RECIPE_FILE = "recipe.yaml"
TRAINER_STATE = trainer_state.TRAINER_STATE
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "generation_config.json")

_write_text = write_text  # the earlier private name


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def _step_of(path: Path) -> Optional[int]:
    name = path.name
    if not name.startswith("step-") or not name[5:].isdigit():
        return None
    return int(name[5:])


# ---------------------------------------------------------------------------------------------- model
def model_tensors(model: MoEForCausalLM, saved: Optional[CheckpointState] = None,
                  state: Optional[dict[str, torch.Tensor]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(Hugging Face name, tensor)`` for every saved tensor of ``model``, one at a time.

    Parameters whose fp32 master copy lives in the optimizer (``saved.named_master_tensors()``, an optimizer's
    :meth:`~moetrain.optim.TrainOptimizer.checkpoint_state`, streamed record by record) come from there; the rest
    from ``state`` (default: ``model.state_dict()``, tensors where they live; an asynchronous save passes its host
    snapshot). A tied ``lm_head.weight`` is left out, as transformers does.
    """
    family = model.config.family
    done: set[str] = set()
    if saved is not None:
        for name, tensor in saved.named_master_tensors():
            done.add(name)
            yield keymap.to_hf_name(family, name), tensor
    for name, tensor in (model.state_dict() if state is None else state).items():
        if name in done or (model.config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        yield keymap.to_hf_name(family, name), tensor.detach()


def model_bytes(model: MoEForCausalLM, saved: Optional[CheckpointState] = None) -> int:
    """Bytes :func:`model_tensors` will yield (fp32 for masters held by the optimizer): a progress bar's total."""
    masters = set(saved.expert_steps) if saved is not None else set()
    return sum(t.numel() * (4 if name in masters else t.element_size()) for name, t in model.state_dict().items()
               if not (model.config.tie_word_embeddings and name == "lm_head.weight"))


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


# ---------------------------------------------------------------------------------------------- checks
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def shard_header(path: Path) -> dict[str, Any]:
    """The safetensors header of ``path``, checked against the file's length (catches truncation).

    Raises:
        ShardError: missing, truncated, or a header that does not describe the file.
    """
    what = "resume from an earlier checkpoint (checkpoints/step-<N>) or re-save this one"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ShardError(f"{path}: {size} bytes, too short for a safetensors file; the shard is truncated. "
                                 f"{what}")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise ShardError(f"{path}: header of {n} bytes runs past the end of the {size}-byte file; the shard "
                                 f"is truncated or corrupted. {what}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file is missing; the checkpoint is incomplete. {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ShardError(f"{path}: the safetensors header is not valid JSON; the shard is corrupted. {what}") from None
    if not isinstance(header, dict):
        raise ShardError(f"{path}: the safetensors header is not a JSON object; the shard is corrupted. {what}")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
            nbytes = numel * _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ShardError(f"{path}: tensor {name!r} has a malformed header entry; the shard is corrupted. "
                             f"{what}") from None
        if stop - begin != nbytes:
            raise ShardError(f"{path}: tensor {name!r} spans {stop - begin} bytes but its shape needs {nbytes}; the "
                             f"shard is corrupted. {what}")
        end = max(end, stop)
    if 8 + n + end != size:
        raise ShardError(f"{path}: the header describes {8 + n + end} bytes but the file has {size}; the shard is "
                         f"truncated or corrupted. {what}")
    return header


def verify_shards(ckpt_dir: Path, prefix: str) -> dict[str, str]:
    """Check every shard of ``prefix`` in ``ckpt_dir`` (headers, lengths, names in the index); returns the map."""
    weight_map = read_weight_map(ckpt_dir, prefix)
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    for fname, names in sorted(by_file.items()):
        header = shard_header(ckpt_dir / fname)
        absent = [n for n in names if n not in header]
        if absent:
            raise ShardError(f"{ckpt_dir / fname}: {prefix}.safetensors.index.json names tensor {absent[0]!r} but the "
                             f"shard does not hold it ({len(absent)} missing); the checkpoint is corrupted, resume "
                             "from an earlier one")
    return weight_map


def verify_checkpoint(ckpt_dir: str | Path, optimizer: bool = True) -> ModelConfig:
    """Check a checkpoint before anything is loaded from it; returns its model config.

    Raises:
        ShardError: a missing, truncated or corrupted file, or an index naming an absent tensor.
        ConfigError: no or an unreadable ``moetrain_config.json``; tensors of the wrong shape.
    """
    from moetrain.models.hf import state_shapes

    ckpt_dir = Path(ckpt_dir)
    try:
        config = ModelConfig.load(ckpt_dir / MOETRAIN_CONFIG)
    except FileNotFoundError:
        raise ConfigError(f"{ckpt_dir}: no {MOETRAIN_CONFIG}; not a complete moetrain checkpoint (pass a "
                          "checkpoints/step-<N> directory or 'last')") from None
    weight_map = verify_shards(ckpt_dir, "model")
    shapes = state_shapes(config)
    expected = {keymap.to_hf_name(config.family, n) for n in shapes
                if not (config.tie_word_embeddings and n == "lm_head.weight")}
    missing = sorted(expected - set(weight_map))
    if missing:
        raise ShardError(f"{ckpt_dir / 'model.safetensors.index.json'}: lacks {len(missing)} tensor(s) the model of "
                         f"{MOETRAIN_CONFIG} needs ({', '.join(missing[:3])}); the checkpoint is incomplete, resume "
                         "from an earlier one")
    if optimizer:
        verify_shards(ckpt_dir, OPTIMIZER_PREFIX)
        from moetrain.training.optimizer_state import read_meta

        read_meta(ckpt_dir)
        trainer_state.read(ckpt_dir)
    return config


# ---------------------------------------------------------------------------------------------- load
@torch.no_grad()
def write_side_files(tmp: Path, config: ModelConfig, dtype: torch.dtype, *, step: int,
                     trainer_state: Optional[dict[str, Any]], recipe: Optional[str],
                     tokenizer_dir: Optional[str | Path]) -> None:
    """Everything of a checkpoint directory but its tensor shards: the family's config.json, the moetrain
    config, the recipe, the tokenizer files, and last ``trainer_state.json`` (its presence marks a
    checkpoint whose every other file is written); then the directory is fsynced."""
    hf_config = _hf_config(config, dtype)
    if hf_config is not None:
        write_text(tmp / HF_CONFIG, json.dumps(hf_config, indent=2) + "\n")
    write_text(tmp / MOETRAIN_CONFIG, json.dumps(config.to_dict(), indent=2) + "\n")
    if recipe is not None:
        write_text(tmp / RECIPE_FILE, recipe)
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                _copy_file(Path(tokenizer_dir) / name, tmp / name)
    write_text(tmp / TRAINER_STATE, json.dumps({"step": step, **(trainer_state or {})}, indent=2) + "\n")
    fsync_dir(tmp)


def load_weights_into(model: MoEForCausalLM, ckpt_dir: str | Path,
                      expert_sink: Optional[Callable[[str, torch.Tensor], None]] = None) -> None:
    """Stream a checkpoint's weights into ``model`` shard by shard (shapes checked; casts to each parameter).
    ``expert_sink(name, tensor)`` also gets every routed expert's saved (fp32 master) weight."""
    from moetrain.models.hf import load_weights

    load_weights(model, ckpt_dir, expert_sink=expert_sink)


def load_model(ckpt_dir: str | Path, dtype: torch.dtype = torch.float32) -> MoEForCausalLM:
    """Rebuild the model saved in checkpoint directory ``ckpt_dir`` (strict: every tensor must be present)."""
    from moetrain.models.hf import empty_model

    ckpt_dir = Path(ckpt_dir)
    config = verify_checkpoint(ckpt_dir, optimizer=False)
    model = empty_model(config, dtype=dtype).train()
    load_weights_into(model, ckpt_dir)
    return model


def load_optimizer_state(ckpt_dir: str | Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """``({param: step}, {"<param>.exp_avg": tensor, ...})`` saved in ``ckpt_dir`` (tensors on the CPU)."""
    from moetrain.training.optimizer_state import read_optimizer_state

    return read_optimizer_state(ckpt_dir)


# ---------------------------------------------------------------------------------------------- save
def _copy_file(src: Path, dst: Path) -> None:
    write_text(dst, src.read_text()) if src.suffix in (".json", ".txt") else shutil.copyfile(src, dst)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: MoEForCausalLM,
    *,
    optimizer: Optional[TrainOptimizer] = None,
    trainer_state: Optional[dict[str, Any]] = None,
    recipe: Optional[str] = None,
    max_shard_bytes: int = 2 * 2**30,
    keep_last: int = 0,
    tokenizer_dir: Optional[str | Path] = None,
) -> Path:
    """Write ``<run_dir>/checkpoints/step-<step>/``, point ``checkpoints/last`` at it and rotate; returns the directory.

    Tensors are read where they live while the file is written (the caller must not step the model
    meanwhile; :mod:`moetrain.training.async_checkpoint` snapshots instead, to write beside training).

    Args:
        optimizer: a :class:`~moetrain.optim.TrainOptimizer` (or None to skip its state).
        trainer_state: the resume state (:func:`moetrain.training.trainer_state.capture`).
        keep_last: keep this many newest checkpoints (0: all).
        tokenizer_dir: copy its tokenizer files into the checkpoint.

    Raises:
        ShardError: the files could not be written (a full disk, no permission); ``last`` is unchanged.
    """
    saved = optimizer.checkpoint_state() if optimizer is not None else None

    def write_optimizer(out: Path) -> None:
        assert saved is not None
        save_optimizer(saved, model, out, max_shard_bytes=max_shard_bytes, step_index=step)

    return write_checkpoint(
        run_dir, step, model.config, dtype=next(model.parameters()).dtype, tensors=model_tensors(model, saved),
        write_optimizer=write_optimizer if saved is not None else None, trainer_state=trainer_state, recipe=recipe,
        max_shard_bytes=max_shard_bytes, keep_last=keep_last, tokenizer_dir=tokenizer_dir,
        total_bytes=model_bytes(model, saved))


def write_checkpoint(
    run_dir: str | Path,
    step: int,
    config: ModelConfig,
    *,
    dtype: torch.dtype,
    tensors: Iterable[tuple[str, torch.Tensor]],
    write_optimizer: Optional[Callable[[Path], None]] = None,
    trainer_state: Optional[dict[str, Any]] = None,
    recipe: Optional[str] = None,
    max_shard_bytes: int = 2 * 2**30,
    keep_last: int = 0,
    tokenizer_dir: Optional[str | Path] = None,
    total_bytes: Optional[int] = None,
    progress: Optional[bool] = None,
) -> Path:
    """The writing half of :func:`save_checkpoint`, from sources already chosen: ``tensors`` (Hugging Face
    name, tensor) for the model shards, ``write_optimizer(dir)`` for the optimizer files.

    ``step-<step>.tmp/`` is written and fsynced, renamed, then ``last`` is switched and old checkpoints
    rotated. Safe to run in a thread other than the training loop's, given sources that do not change.
    ``progress``: the shard bar (None: shown on a terminal, see :mod:`moetrain.progress`).
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step-*.tmp"):
            shutil.rmtree(stale)  # left over from a process killed while writing
        tmp.mkdir()
        shown = tensor_progress(tensors, f"save {final.name}", total_bytes, enabled=progress)
        write_sharded(shown, tmp, prefix="model", max_shard_bytes=max_shard_bytes)
        if write_optimizer is not None:
            write_optimizer(tmp)
        write_side_files(tmp, config, dtype, step=step, trainer_state=trainer_state, recipe=recipe,
                         tokenizer_dir=tokenizer_dir)
        if final.exists():
            shutil.rmtree(final)  # the same step saved again (a re-run into the same directory)
        tmp.rename(final)
        fsync_dir(root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)  # frees what was written (a full disk needs the room)
        pointer = root / LAST_FILE
        previous = pointer.read_text().strip() if pointer.is_file() else None
        kept = f"{pointer} still names {previous}, which is intact" if previous else "no earlier checkpoint exists"
        raise ShardError(f"{tmp}: writing checkpoint {final.name} failed ({err.strerror or err}); {kept}. Free disk "
                         "space or choose a writable trainer.default_root_dir, then resume with --ckpt_path=last") \
            from None
    write_text(root / LAST_FILE, final.name + "\n")
    fsync_dir(root)
    if keep_last > 0:
        rotate(root, keep_last)
    return final


def rotate(root: Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the ``keep_last`` newest (never the one ``last`` names)."""
    current = (root / LAST_FILE).read_text().strip() if (root / LAST_FILE).is_file() else None
    steps = sorted((s, p) for p in root.iterdir() if p.is_dir() and (s := _step_of(p)) is not None)
    removed = []
    for _, path in steps[:-keep_last]:
        if path.name != current:
            shutil.rmtree(path)
            removed.append(path)
    return removed
