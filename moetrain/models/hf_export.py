"""Exporting to Hugging Face: the family's per-expert layout with ``config.json`` (see
:mod:`moetrain.models.hf_configs`) and ``moetrain_config.json``, which keeps the fields no config.json can hold (the
router z-loss, the name). A family transformers has no class for (DeepSeek-MoE v1) also gets its modelling files
(:mod:`moetrain.models.hf_code`), which config.json's ``auto_map`` names, so the export loads with
``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``. ``moetrain export`` converts a checkpoint
directory shard by shard, without building the model."""

from __future__ import annotations

import importlib.resources
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch

from moetrain.config import ConfigError, ModelConfig
from moetrain.models import keymap
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf_configs import REMOTE_CODE, config_to_hf, remote_code_files
from moetrain.models.hf_files import (
    HF_CONFIG,
    MOETRAIN_CONFIG,
    TOKENIZER_FILES,
    DType,
    as_dtype,
    load_config,
    resolve_model_path,
)
from moetrain.models.hf_load import checked_tensors, state_shapes
from moetrain.shards import ShardError, write_sharded

# Tensors written in fp32 whatever the export dtype (transformers keeps them fp32 too): DeepSeek-V3's routing
# bias moves by ~1e-3 per step, which bf16 would round away.
_KEEP_FP32_RE = re.compile(r"\.e_score_correction_bias$")


def hf_named_tensors(model: MoEForCausalLM, dtype: Optional[DType] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(Hugging Face name, CPU tensor)`` in the family's per-expert layout, one tensor at a time.

    A tied ``lm_head.weight`` is left out, as transformers' ``save_pretrained`` does.
    """
    family = model.config.family
    cast = None if dtype is None else as_dtype(dtype)
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        out = tensor.detach()
        if cast is not None and not _KEEP_FP32_RE.search(name):
            out = out.to(cast)
        yield keymap.to_hf_name(family, name), out.cpu()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_model_code(config: ModelConfig, out_dir: Path) -> list[str]:
    """Copy the modelling files that the family's ``auto_map`` names into ``out_dir`` (DeepSeek-MoE v1, which
    transformers does not ship); returns their names (none for the other families)."""
    names = remote_code_files(config.family)
    if names:
        package = importlib.resources.files("moetrain.models.hf_code") / REMOTE_CODE[config.family][0]
        for name in names:
            (out_dir / name).write_bytes((package / name).read_bytes())
    return names


def export_hf(
    model: MoEForCausalLM,
    out_dir: str | Path,
    dtype: Optional[DType] = None,
    *,
    max_shard_bytes: int = 5 * 2**30,
) -> dict[str, str]:
    """Write ``model`` as a Hugging Face directory of its family (sharded safetensors, index, config.json).

    Also writes ``moetrain_config.json`` so that :func:`from_pretrained` restores the exact config, and the
    family's modelling files when transformers has no class for it (:func:`write_model_code`).
    Returns the weight map {tensor name: shard file}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    if dtype is None:
        dtype = next(model.parameters()).dtype
    torch_dtype = str(as_dtype(dtype)).removeprefix("torch.")
    # refuse an unexportable config before writing
    hf_config = config_to_hf(config, torch_dtype=torch_dtype, with_code=True)
    weight_map = write_sharded(hf_named_tensors(model, dtype), out_dir, max_shard_bytes=max_shard_bytes)
    write_model_code(config, out_dir)
    _write_json(out_dir / HF_CONFIG, hf_config)
    _write_json(out_dir / MOETRAIN_CONFIG, config.to_dict())
    return weight_map



def convert_checkpoint(
    src: str | Path, out_dir: str | Path, dtype: Optional[DType] = None, *, max_shard_bytes: int = 5 * 2**30
) -> dict[str, str]:
    """Re-write a model directory (Hugging Face or moetrain checkpoint, either expert layout) as a Hugging Face
    directory of its family, streaming tensor by tensor: the model is never built in memory.

    ``config.json`` and ``moetrain_config.json`` are written last, so an export that fails midway (a missing
    tensor, a full disk) leaves no directory that looks loadable. A family transformers has no class for also
    gets its modelling files (:func:`write_model_code`), which config.json's ``auto_map`` names.
    """
    src, out_dir = Path(src), Path(out_dir)
    config = load_config(src)
    shapes = state_shapes(config)
    cast = None if dtype is None else as_dtype(dtype)
    hf_config = config_to_hf(config, with_code=True)  # refuse an unexportable config before writing anything

    stored: list[torch.dtype] = []

    def renamed() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in checked_tensors(src, config, shapes):
            if not stored:
                stored.append(tensor.dtype)
            keep = cast is None or _KEEP_FP32_RE.search(name)
            yield keymap.to_hf_name(config.family, name), tensor if keep else tensor.to(cast)

    weight_map = write_sharded(renamed(), out_dir, max_shard_bytes=max_shard_bytes)
    hf_config["torch_dtype"] = str(cast or stored[0]).removeprefix("torch.")
    write_model_code(config, out_dir)
    _write_json(out_dir / HF_CONFIG, hf_config)
    _write_json(out_dir / MOETRAIN_CONFIG, config.to_dict())
    return weight_map


def export_main(argv: list[str]) -> int:
    """``moetrain export --ckpt SOURCE --out OUT_DIR [--dtype bf16] [--max-shard-mb N]`` (or SOURCE OUT_DIR as
    positional arguments); returns the exit status."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="moetrain export",
        description="Write a moetrain checkpoint (or any supported model directory) as a Hugging Face model "
                    "directory of its family: per-expert safetensors shards, index and config.json.")
    parser.add_argument("source", type=Path, nargs="?", help="checkpoint directory, run directory (uses "
                        "checkpoints/last), or Hugging Face model directory (same as --ckpt)")
    parser.add_argument("out_dir", type=Path, nargs="?", help="new directory to write (must not exist or be empty; "
                        "same as --out)")
    parser.add_argument("--ckpt", type=Path, default=None, help="the source, as the positional SOURCE")
    parser.add_argument("--out", type=Path, default=None, help="the output directory, as the positional OUT_DIR")
    parser.add_argument("--dtype", default=None, help="cast weights: bf16, fp16, fp32 or a torch dtype name "
                        "(default: keep the stored dtype)")
    parser.add_argument("--max-shard-mb", type=int, default=5 * 1024, help="largest shard size in MiB")
    args = parser.parse_args(argv)
    args.source, args.out_dir = args.ckpt or args.source, args.out or args.out_dir
    if args.source is None or args.out_dir is None:
        parser.error("pass the checkpoint (--ckpt DIR) and the output directory (--out HF_DIR)")
    try:
        source = resolve_model_path(args.source)
        if args.out_dir.exists() and any(args.out_dir.iterdir()):
            raise ConfigError(f"{args.out_dir} exists and is not empty; choose a new output directory")
        weight_map = convert_checkpoint(source, args.out_dir, dtype=args.dtype,
                                        max_shard_bytes=args.max_shard_mb * 2**20)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                (args.out_dir / name).write_bytes((source / name).read_bytes())
    except (ConfigError, ShardError, OSError) as err:
        print(f"moetrain export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(weight_map)} tensors in {len(set(weight_map.values()))} shard(s) to {args.out_dir}")
    print(load_hint(load_config(args.out_dir), args.out_dir))
    return 0


def load_hint(config: ModelConfig, out_dir: Path) -> str:
    """How to load an export of ``config``'s family in transformers (printed by ``moetrain export``)."""
    if config.family in REMOTE_CODE:
        code = " and ".join(remote_code_files(config.family))
        return (f"load it in transformers with AutoModelForCausalLM.from_pretrained({str(out_dir)!r}, "
                f"trust_remote_code=True): transformers has no {config.family} class, so the model's code is in "
                f"{code} next to the weights")
    return f"load it in transformers with AutoModelForCausalLM.from_pretrained({str(out_dir)!r})"
