"""Random Hugging Face model directories of any preset's exact shape: real-size inputs without a download.

:func:`write_random_hf` writes what a user's download holds (sharded safetensors with the family's on-disk
names, ``model.safetensors.index.json``, ``config.json``, a tokenizer, and for DeepSeek-MoE the modelling code
its ``auto_map`` names) for a preset under ``configs/models/``, so ``model.init_from``, ``moetrain plan``,
``from_pretrained`` and transformers read it exactly as they read the real model.
No ``moetrain_config.json`` is written: the config comes from ``config.json``, as for a download.

Streaming, one tensor at a time: every tensor's name, dtype and shape are known before a value is drawn (from
the model built on the meta device), so each shard's safetensors header is written first and the tensors'
bytes follow as they are generated::

    meta model ──► [(hf name, dtype, shape)] ──► shards of ~max_shard_bytes ──► header of shard i
    random_tensors(seed) ──► tensor ──► bytes appended to shard i ──► fsync, rename ──► ... ──► index, config.json

Host memory holds the tensors in flight (about 1 GiB ahead) and no shard. Values are those of
:func:`moetrain.models.random_init.build_random` with the same seed (on the same device type), rounded to
``dtype``. ``config.json`` is written last, so a run stopped midway leaves no directory that looks loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from moetrain.atomic import write_text
from moetrain.config import ConfigError, ModelConfig
from moetrain.models import keymap
from moetrain.models.hf_config_write import config_to_hf
from moetrain.models.hf_export import write_model_code
from moetrain.models.hf_files import HF_CONFIG, TOKENIZER_FILES
from moetrain.models.random_init import meta_model, random_tensors

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "examples" / "tokenizer"
"""The shipped byte-level BPE tokenizer with a ChatML template (its ids fit every preset's vocabulary)."""
INDEX = "model.safetensors.index.json"
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
_SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the directory: on-disk (Hugging Face) name, internal name, dtype, shape."""

    hf_name: str
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


@dataclass
class Progress:
    """What has been written so far (handed to ``on_progress`` after every tensor and every finished shard)."""

    tensors: int
    total_tensors: int
    bytes: int
    total_bytes: int
    shards_done: int
    total_shards: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / max(self.seconds, 1e-9)

    def line(self) -> str:
        gb, total = self.bytes / 1e9, self.total_bytes / 1e9
        return (f"{self.tensors}/{self.total_tensors} tensors, {gb:.2f}/{total:.2f} GB, {self.shards_done}/"
                f"{self.total_shards} shards written, {self.gb_per_s:.2f} GB/s, {self.seconds:.0f} s")


def preset_config(preset: str, *, layers: Optional[int] = None,
                  overrides: Optional[dict[str, Any]] = None) -> ModelConfig:
    """The config of ``preset`` (a name under ``configs/models/`` or a YAML path) with ``layers`` decoder layers
    and any other field overrides."""
    fields = dict(overrides or {})
    if layers is not None:
        if layers < 1:
            raise ConfigError(f"--layers {layers}: a model needs at least one layer")
        fields["num_hidden_layers"] = layers
    return ModelConfig.from_preset(preset, **fields)  # validated as it is built


def tensor_layout(config: ModelConfig, dtype: torch.dtype) -> list[TensorEntry]:
    """Every tensor a Hugging Face directory of ``config`` holds, in the order an export writes them (state-dict
    order, a tied ``lm_head.weight`` left out), with the dtype a ``dtype`` export gives it."""
    model = meta_model(config).to(dtype)  # the cast keeps DeepSeek-V3's routing bias fp32, as an export does
    entries = []
    for name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        entries.append(TensorEntry(keymap.to_hf_name(config.family, name), name, tensor.dtype, tuple(tensor.shape)))
    return entries


def plan_shards(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Cut ``entries`` in order into shards of at most ``max_shard_bytes`` (a larger tensor gets a shard alone),
    as :func:`moetrain.shards.write_sharded` cuts them."""
    shards: list[list[TensorEntry]] = []
    size = 0
    for entry in entries:
        if not shards or (shards[-1] and size + entry.nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def safetensors_header(entries: list[TensorEntry]) -> bytes:
    """The safetensors prefix for ``entries`` stored back to back in this order: the 8-byte little-endian header
    length, then the JSON header padded with spaces to a multiple of 8 (the data then starts aligned)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.hf_name] = {"dtype": _SAFETENSORS_DTYPE[e.dtype], "shape": list(e.shape),
                             "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _SAFETENSORS_DTYPE:
            raise ConfigError(f"dtype {dtype} is not written; use bf16, fp16 or fp32")
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose bf16, fp16 or fp32")
    return DTYPES[dtype]


def _copy_tokenizer(tokenizer: Path, out_dir: Path) -> list[str]:
    if not (tokenizer / "tokenizer.json").is_file() and not (tokenizer / "tokenizer.model").is_file():
        raise ConfigError(f"{tokenizer}: no tokenizer.json or tokenizer.model; pass a Hugging Face tokenizer directory")
    copied = []
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, out_dir / name)
            copied.append(name)
    return copied


def write_random_hf(
    config: ModelConfig,
    out_dir: str | Path,
    *,
    dtype: str | torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_bytes: int = 5 * 10**9,
    device: str | torch.device = "cpu",
    tokenizer: Optional[str | Path] = DEFAULT_TOKENIZER,
    threads: Optional[int] = None,
    on_progress: Optional[Callable[[Progress], None]] = None,
) -> dict[str, str]:
    """Write a random Hugging Face directory of ``config``'s shape to ``out_dir`` (new, or empty).

    Args:
        config: the model shape (see :func:`preset_config`).
        out_dir: the directory to create.
        dtype: the weights' dtype on disk (``bf16`` as published checkpoints; DeepSeek-V3's routing bias fp32).
        seed: the values are those of ``build_random(config, seed)`` on ``device``'s type, rounded to ``dtype``.
        max_shard_bytes: the largest shard (a larger single tensor gets a shard of its own).
        device: where values are drawn: ``cpu`` (every core) or ``cuda`` (much faster; other values).
        tokenizer: a tokenizer directory to copy (None: none); its vocabulary may be smaller than the config's.
        threads: CPU threads drawing values (default: torch's intra-op thread count).
        on_progress: called with a :class:`Progress` after every tensor and every finished shard.

    Returns:
        The weight map {Hugging Face tensor name: shard file}, as the index holds it.

    Raises:
        ConfigError: ``out_dir`` is not empty, an unknown dtype, a config the family's config.json cannot express,
            or a tokenizer directory without a tokenizer.
    """
    out_dir = Path(out_dir)
    torch_dtype = _as_dtype(dtype)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} exists and is not an empty directory; choose a new output directory")
    # refuse a config the family's config.json cannot express before writing anything
    hf_config = config_to_hf(config, torch_dtype=str(torch_dtype).removeprefix("torch."), with_code=True)
    entries = tensor_layout(config, torch_dtype)
    shards = plan_shards(entries, max_shard_bytes)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    total = sum(e.nbytes for e in entries)
    done_tensors = done_bytes = 0
    stream = random_tensors(config, seed, dtype=torch_dtype, device=device, threads=threads)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        path = out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "wb") as f:
            f.write(safetensors_header(shard))
            for entry in shard:
                name, tensor = next(stream)
                if name != entry.name or tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                    raise RuntimeError(f"generated {name} {tensor.dtype} {tuple(tensor.shape)} where the header "
                                       f"holds {entry}")  # a bug: both come from the same meta model
                f.write(memoryview(tensor.contiguous().view(torch.uint8).numpy()))
                weight_map[entry.hf_name] = path.name
                done_tensors += 1
                done_bytes += entry.nbytes
                if on_progress is not None:
                    on_progress(Progress(done_tensors, len(entries), done_bytes, total, i - 1, len(shards),
                                         time.perf_counter() - start))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if on_progress is not None:
            on_progress(Progress(done_tensors, len(entries), done_bytes, total, i, len(shards),
                                 time.perf_counter() - start))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_text(out_dir / INDEX, json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        _copy_tokenizer(Path(tokenizer), out_dir)
    write_model_code(config, out_dir)  # DeepSeek-MoE's download ships its modelling code, which auto_map names
    write_text(out_dir / HF_CONFIG, json.dumps(hf_config, indent=2) + "\n")
    return weight_map


class ProgressLine:
    """``on_progress`` for a terminal: one line rewritten at most every ``every`` seconds; elsewhere (logs) a line
    per finished shard."""

    def __init__(self, stream: Any = None, every: float = 0.5) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every
        self._last = -every
        self._shards = 0

    def __call__(self, p: Progress) -> None:
        last = p.shards_done == p.total_shards
        if self.tty and (p.seconds - self._last >= self.every or last):
            self._last = p.seconds
            print(f"\r{p.line()}\033[K", end="\n" if last else "", file=self.stream, flush=True)
        elif not self.tty and p.shards_done > self._shards:
            print(p.line(), file=self.stream, flush=True)
        self._shards = p.shards_done


def main(argv: Optional[list[str]] = None) -> int:
    """``make_random_hf.py --preset NAME --out DIR [--dtype bf16] [--seed 0] [--layers N] [--shard-gb 5]
    [--set KEY=VALUE ...] [--device auto|cpu|cuda] [--tokenizer DIR]``; returns the exit status."""
    import argparse

    import yaml

    parser = argparse.ArgumentParser(
        prog="make_random_hf.py",
        description="Write a random Hugging Face model directory of a preset's exact shape and key layout "
                    "(sharded safetensors, index, config.json, tokenizer), streaming: real-size input for "
                    "model.init_from, moetrain plan and from_pretrained without a download.")
    parser.add_argument("--preset", required=True, help="a name under configs/models/ (deepseek-moe-16b, ...) or a "
                        "YAML path")
    parser.add_argument("--out", required=True, type=Path, help="new (or empty) output directory")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weights on disk (default bf16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset field (YAML value), e.g. --set vocab_size=768; repeatable")
    parser.add_argument("--shard-gb", type=float, default=5.0, help="largest shard in GB (default 5)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where values are drawn (auto: cuda when a GPU is visible)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads drawing values (default: all)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                        help="tokenizer directory to copy (default: the shipped one)")
    args = parser.parse_args(argv)
    try:
        overrides = {}
        for item in args.overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item}: expected KEY=VALUE")
            overrides[key] = yaml.safe_load(value)
        config = preset_config(args.preset, layers=args.layers, overrides=overrides)
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        counts = config.param_counts()
        print(f"{config.name}: {config.num_hidden_layers} layers, {counts['total'] / 1e9:.2f} B parameters, "
              f"{args.dtype} -> {args.out} (values drawn on {device}, seed {args.seed})", file=sys.stderr)
        start = time.perf_counter()
        weight_map = write_random_hf(config, args.out, dtype=args.dtype, seed=args.seed,
                                     max_shard_bytes=int(args.shard_gb * 1e9), device=device,
                                     tokenizer=args.tokenizer, threads=args.threads, on_progress=ProgressLine())
    except (ConfigError, OSError) as err:
        print(f"make_random_hf: error: {err}", file=sys.stderr)
        return 2
    shards = len(set(weight_map.values()))
    print(f"wrote {len(weight_map)} tensors in {shards} shard(s) to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0
