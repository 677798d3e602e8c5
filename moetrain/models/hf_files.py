"""The files of a model directory and where a run keeps its checkpoints: the names, the config a directory holds
(``moetrain_config.json`` before ``config.json``), and which directory a path given by the user stands for (a run
directory stands for its newest complete checkpoint, ``checkpoints/last``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch

from moetrain.config import ConfigError, ModelConfig
from moetrain.models.hf_configs import config_from_hf

MOETRAIN_CONFIG = "moetrain_config.json"
HF_CONFIG = "config.json"
CHECKPOINTS_DIR = "checkpoints"
LAST_FILE = "last"
"""A run directory keeps its checkpoints in ``CHECKPOINTS_DIR/step-<N>``; ``CHECKPOINTS_DIR/LAST_FILE`` names the
newest complete one."""

DType = Union[torch.dtype, str]
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Copied next to the weights by ``moetrain export`` when the source has them (checkpoints carry the run's tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "generation_config.json")


def as_dtype(dtype: DType) -> torch.dtype:
    """``dtype`` as a torch dtype; also accepts ``bf16``, ``fp16``, ``fp32`` and ``torch.``-prefixed names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    resolved = getattr(torch, _DTYPE_ALIASES.get(name, name), None)
    if not isinstance(resolved, torch.dtype):
        raise ConfigError(f"dtype={dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    return resolved


def read_json(path: Path) -> dict:
    """A JSON file; invalid JSON is a ConfigError naming the file and line."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from None


def load_config(path: str | Path) -> ModelConfig:
    """The model config of a model directory: ``moetrain_config.json`` when present, else ``config.json``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist; pass a Hugging Face model directory, a moetrain checkpoint "
                          "(runs/NAME/checkpoints/step-N) or a run directory")
    if not path.is_dir():
        raise ConfigError(f"{path}: not a directory; pass a Hugging Face model directory or a moetrain checkpoint")
    if (path / MOETRAIN_CONFIG).exists():
        return ModelConfig.load(path / MOETRAIN_CONFIG)
    if (path / HF_CONFIG).exists():
        return config_from_hf(read_json(path / HF_CONFIG), source=str(path / HF_CONFIG), name=path.name)
    raise ConfigError(f"{path}: neither {MOETRAIN_CONFIG} nor {HF_CONFIG} found; is this a model directory?")



def resolve_model_path(path: str | Path) -> Path:
    """The model directory that ``path`` names: a run directory (or its ``checkpoints/last`` pointer file) stands
    for its newest complete checkpoint; any other path is returned as it is.

    Raises:
        ConfigError: a run directory without a complete checkpoint, or a ``last`` naming a missing directory.
    """
    path = Path(path)
    pointer = path / "checkpoints" / "last"
    if path.is_dir() and pointer.is_file():
        path = pointer
    if path.is_file() and path.name == "last":
        target = path.parent / path.read_text().strip()
        if not target.is_dir():
            raise ConfigError(f"{path} names {target.name!r}, which is not a directory; the run has no complete "
                              "checkpoint (pass an existing checkpoints/step-<N> directory)")
        return target
    if (path / "checkpoints").is_dir() and not any((path / n).is_file() for n in (HF_CONFIG, MOETRAIN_CONFIG)):
        raise ConfigError(f"{path} is a run directory without a complete checkpoint (no checkpoints/last yet); let "
                          "the run save one, or pass a checkpoints/step-<N> directory")
    return path


def resolve_checkpoint(path: str | Path, run_dir: str | Path) -> Path:
    """The checkpoint directory named by ``--ckpt_path``: ``last`` reads ``<run_dir>/checkpoints/last``; a run
    directory stands for its own ``checkpoints/last``.

    Raises:
        ConfigError: the path does not exist, nothing to resume from, or the directory is incomplete.
    """
    if str(path) == "last":
        pointer = Path(run_dir) / CHECKPOINTS_DIR / LAST_FILE
        if not pointer.is_file():
            raise ConfigError(f"--ckpt_path=last: {pointer} not found; no complete checkpoint in run directory "
                              f"{run_dir} (check --trainer.default_root_dir, or drop --ckpt_path to start fresh)")
        ckpt = pointer.parent / pointer.read_text().strip()
        if not ckpt.is_dir():
            raise ConfigError(f"--ckpt_path=last: {pointer} names {ckpt.name!r}, but {ckpt} does not exist (deleted "
                              "or moved?); pass an existing checkpoints/step-<N> directory instead")
    else:
        ckpt = Path(path)
        if not ckpt.exists():
            raise ConfigError(f"--ckpt_path={path}: {ckpt} does not exist; pass a run directory, one of its "
                              "checkpoints/step-<N> directories, or 'last' with --trainer.default_root_dir set to "
                              "the run directory")
        if (ckpt / CHECKPOINTS_DIR / LAST_FILE).is_file():  # a run directory
            return resolve_checkpoint("last", ckpt)
    if not (ckpt / MOETRAIN_CONFIG).is_file():
        raise ConfigError(f"--ckpt_path: {ckpt} is not a complete moetrain checkpoint (no {MOETRAIN_CONFIG}); "
                          "pass a checkpoints/step-<N> directory or 'last'")
    return ckpt
