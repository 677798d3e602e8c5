"""Sharded safetensors files with a Hugging Face index (``<prefix>.safetensors.index.json``).

Writing streams: tensors arrive one at a time from an iterator and a shard is flushed as soon as it
reaches ``max_shard_bytes``, so at most about one shard is held in host memory. Every file is written
under a temporary name, fsynced and renamed, so a reader never sees a torn shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moetrain.atomic import write_text


class ShardError(RuntimeError):
    """A sharded file set is missing, truncated, or does not hold what its index names."""


def _save_shard(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]]) -> None:
    tmp = path.with_name(path.name + ".part")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_sharded(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | Path,
    *, prefix: str = "model",
    max_shard_bytes: int = 2 * 2**30,
    metadata: Optional[dict[str, str]] = None,
    on_tensor: Optional[Callable[[str, int], None]] = None,
) -> dict[str, str]:
    """Write ``(name, tensor)`` pairs as ``<prefix>-0000i-of-0000n.safetensors`` plus the index.

    Returns the weight map {tensor name: file name}. ``on_tensor(name, nbytes)`` reports progress.
    Shard names need the total count, so shards are first written as ``<prefix>-0000i.safetensors``
    and renamed once the count is known.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, list[str]]] = []
    batch: dict[str, torch.Tensor] = {}
    batch_bytes = 0
    total_bytes = 0

    def flush() -> None:
        nonlocal batch, batch_bytes
        if not batch:
            return
        path = out_dir / f"{prefix}-{len(written) + 1:05d}.safetensors"
        _save_shard(batch, path, metadata or {"format": "pt"})
        written.append((path, list(batch)))
        batch, batch_bytes = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if batch and batch_bytes + nbytes > max_shard_bytes:
            flush()
        if name in batch:
            raise ShardError(f"tensor {name!r} given twice while writing {out_dir}")
        batch[name] = tensor
        batch_bytes += nbytes
        total_bytes += nbytes
        if on_tensor is not None:
            on_tensor(name, nbytes)
    flush()
    weight_map: dict[str, str] = {}
    n = len(written)
    for i, (path, names) in enumerate(written, start=1):
        final = out_dir / f"{prefix}-{i:05d}-of-{n:05d}.safetensors"
        os.replace(path, final)
        for name in names:
            weight_map[name] = final.name
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    write_text(out_dir / f"{prefix}.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return weight_map


def read_weight_map(model_dir: str | Path, prefix: str = "model") -> dict[str, str]:
    """{tensor name: shard file} from the index, or from a single ``<prefix>.safetensors``."""
    model_dir = Path(model_dir)
    index_path = model_dir / f"{prefix}.safetensors.index.json"
    single = model_dir / f"{prefix}.safetensors"
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ShardError(f"{index_path}: not a valid safetensors index ({err}); re-export or re-save it") from None
        return dict(weight_map)
    if single.exists():
        with _open(single) as f:
            return {k: single.name for k in f.keys()}
    raise ShardError(f"{model_dir}: no {index_path.name} and no {single.name}; is this a model directory?")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file is missing; the checkpoint is incomplete") from None
    except Exception as err:  # safetensors raises its own error types for truncated headers
        raise ShardError(f"{path}: cannot read safetensors header ({err}); "
                         "the file is truncated or corrupted") from None


def iter_shard_tensors(
    model_dir: str | Path, prefix: str = "model", names: Optional[Iterable[str]] = None
) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """Yield ``(shard path, name, tensor)`` for every tensor the index names (or only those of ``names``
    that it names), one shard open at a time."""
    model_dir = Path(model_dir)
    weight_map = read_weight_map(model_dir, prefix)
    selected = weight_map if names is None else {n: weight_map[n] for n in names if n in weight_map}
    by_file: dict[str, list[str]] = {}
    for name, fname in selected.items():
        by_file.setdefault(fname, []).append(name)
    for fname in sorted(by_file):
        path = model_dir / fname
        with _open(path) as f:
            present = set(f.keys())
            for name in by_file[fname]:
                if name not in present:
                    raise ShardError(f"{path}: the index names tensor {name!r} but the shard does not hold it")
                try:
                    tensor = f.get_tensor(name)
                except Exception as err:
                    raise ShardError(f"{path}: tensor {name!r} cannot be read ({err}); the shard is truncated "
                                     "or corrupted") from None
                yield path, name, tensor


def iter_sharded(model_dir: str | Path, prefix: str = "model") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor named in the index, one shard open at a time (streaming)."""
    for _, name, tensor in iter_shard_tensors(model_dir, prefix):
        yield name, tensor
