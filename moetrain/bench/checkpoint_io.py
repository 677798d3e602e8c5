"""Checkpoint I/O on this machine: save and load GB/s against the disk's own speed, and the peak host memory
of streaming a Hugging Face directory into a model (``init_from``).

    python -m moetrain.bench.checkpoint_io --out DIR --scratch /nvme/tmp            # 4-layer DeepSeek-MoE-16B
    python -m moetrain.bench.checkpoint_io --out DIR --init-sizes-gb 8,24,48 --skip-save

1. Disk: a ``--disk-gb`` file is written (fsynced) and read back after its pages are dropped from the page
   cache (``posix_fadvise(DONTNEED)``, which needs no privileges), in 64 MiB requests.
2. Save/load: the ``--preset`` model cut to ``--layers`` layers (default: DeepSeek-MoE-16B's shape, 4 layers)
   is built on the GPU, its optimizer under ``--tier`` (experts' fp32 state in pinned host memory by default)
   is given state, and :func:`~moetrain.training.checkpoint.save_checkpoint` writes it; then the pages are
   dropped and the weights and optimizer state are loaded back into the live model and optimizer. Each is
   reported as bytes on disk / seconds, next to the disk's figures, with the host memory it added (peak RSS
   sampled every 10 ms, minus the RSS before).
3. init_from: for each size in ``--init-sizes-gb``, a synthetic Hugging Face directory of that many GB (bf16,
   ``--shard-mb`` shards, DeepSeek-MoE-16B-shaped layers) is written, its pages dropped, and a fresh process
   runs ``from_pretrained(dir, dtype=--init-dtype, device=cuda)`` (what ``model.init_from`` does on a GPU);
   its peak RSS (``ru_maxrss``) is reported against the model size, the shard size and the host memory.
   Streaming means the peak follows the shard size, not the model size. Sizes are arguments because the disk
   may not hold a bf16 model larger than half the host memory; ``--init-dtype fp32`` loads it in the training
   precision, twice its size on disk, which is how a model larger than half the host memory is loaded there.

Prints one ``RESULT {json}`` line and writes ``checkpoint_io.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

CHUNK = 64 << 20


# ---------------------------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples this process's RSS every ``interval`` seconds while active; ``added`` is peak minus start."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def added(self) -> int:
        return self.peak - self.start


def drop_cache(path: Path) -> None:
    """Evict the (clean, fsynced) pages of every file under ``path`` from the page cache."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- disk
def disk_speed(scratch: Path, gb: float) -> dict[str, float]:
    """Sequential write (fsynced) and cold read GB/s of a ``gb``-GB file in ``scratch``."""
    path = scratch / "disk-speed.bin"
    buf = mmap.mmap(-1, CHUNK)
    buf.write(os.urandom(1 << 20) * (CHUNK >> 20))
    n = max(1, int(gb * 1e9) // CHUNK)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(n):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    write_s = time.perf_counter() - t0
    drop_cache(path)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.readv(fd, [buf]) > 0:
            pass
    finally:
        os.close(fd)
    read_s = time.perf_counter() - t0
    path.unlink()
    nbytes = n * CHUNK
    return {"disk_bytes": nbytes, "disk_write_gbps": nbytes / write_s / 1e9, "disk_read_gbps": nbytes / read_s / 1e9}


# ---------------------------------------------------------------------------------------------- save / load
def _fill_(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)


def save_load(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from moetrain.config import ModelConfig
    from moetrain.models.hf import empty_model
    from moetrain.offload import build_optimizer
    from moetrain.offload.config import resolve, settings_from_flat
    from moetrain.optim import OptimizerConfig
    from moetrain.training.checkpoint import load_weights_into, save_checkpoint
    from moetrain.training.optimizer_state import load_optimizer

    config = ModelConfig.from_preset(args.preset, num_hidden_layers=args.layers)
    model = empty_model(config, dtype=torch.float32, device=device)
    _fill_(model)
    offload = resolve(settings_from_flat(tier=args.tier,
                                         nvme_path=str(args.scratch / "swap") if args.tier == "nvme" else None))
    if offload.nvme_path:
        Path(offload.nvme_path).mkdir(parents=True, exist_ok=True)
    opt = build_optimizer(model, OptimizerConfig(), offload)
    # give every dense parameter AdamW state (zero gradients are enough to create it); expert records
    # always hold moments, so the checkpoint has the full size of a trained one
    dense = opt.checkpoint_state().dense
    for group in dense.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    dense.step()
    dense.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    run = args.scratch / "ckpt-run"
    shutil.rmtree(run, ignore_errors=True)
    with PeakRss() as save_mem:
        t0 = time.perf_counter()
        ckpt = save_checkpoint(run, 1, model, optimizer=opt, trainer_state={}, max_shard_bytes=args.shard_mb << 20)
        save_s = time.perf_counter() - t0
    nbytes = dir_bytes(ckpt)
    drop_cache(ckpt)
    with PeakRss() as load_mem:
        t0 = time.perf_counter()
        load_weights_into(model, ckpt)
        load_optimizer(opt, model, ckpt)
        if device.type == "cuda":
            torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
    shutil.rmtree(run)
    opt.close()
    return {
        "model": f"{args.preset} x {args.layers} layers", "params": model.num_parameters(), "tier": args.tier,
        "ckpt_bytes": nbytes, "shard_bytes": args.shard_mb << 20,
        "save_s": save_s, "save_gbps": nbytes / save_s / 1e9, "save_host_added_bytes": save_mem.added,
        "load_s": load_s, "load_gbps": nbytes / load_s / 1e9, "load_host_added_bytes": load_mem.added,
    }


# ---------------------------------------------------------------------------------------------- init_from
def synthetic_layers(gb: float, preset: str) -> int:
    """Layers of ``preset``'s shape whose bf16 weights come to about ``gb`` GB."""
    from moetrain.config import ModelConfig
    from moetrain.models.hf import state_shapes

    def size(layers: int) -> int:
        shapes = state_shapes(ModelConfig.from_preset(preset, num_hidden_layers=layers))
        return 2 * sum(int(torch.Size(s).numel()) for s in shapes.values())

    one, two = size(1), size(2)
    return max(1, round((gb * 1e9 - one) / (two - one)) + 1)


def write_synthetic_hf(out: Path, preset: str, layers: int, *, shard_bytes: int) -> int:
    """A Hugging Face directory of ``preset`` with ``layers`` layers, bf16 weights, written tensor by tensor."""
    from moetrain.config import ModelConfig
    from moetrain.models import keymap
    from moetrain.models.hf import config_to_hf, state_shapes
    from moetrain.shards import write_sharded

    config = ModelConfig.from_preset(preset, num_hidden_layers=layers)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in state_shapes(config).items():
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue
            yield keymap.to_hf_name(config.family, name), torch.full(shape, 0.01, dtype=torch.bfloat16)

    out.mkdir(parents=True, exist_ok=True)
    write_sharded(tensors(), out, max_shard_bytes=shard_bytes)
    (out / "config.json").write_text(json.dumps(config_to_hf(config, torch_dtype="bfloat16"), indent=2))
    return dir_bytes(out)


CHILD = """
import resource, sys, time, torch
from moetrain.bench.checkpoint_io import PeakRss
from moetrain.models.hf import from_pretrained
device = sys.argv[2]
dtype = getattr(torch, sys.argv[3])
torch.zeros(1, device=device)  # the CUDA context's host memory is not the loader's
with PeakRss(0.002) as mem:
    t0 = time.perf_counter()
    model = from_pretrained(sys.argv[1], dtype=dtype, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
loaded = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(mem.added, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, seconds, loaded)
"""


def init_from_rss(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for gb in args.init_sizes_gb:
        layers = synthetic_layers(gb, args.preset)
        out = args.scratch / f"hf-{gb}gb"
        shutil.rmtree(out, ignore_errors=True)
        model_bytes = write_synthetic_hf(out, args.preset, layers, shard_bytes=args.shard_mb << 20)
        drop_cache(out)
        dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.init_dtype]
        res = subprocess.run([sys.executable, "-c", CHILD, str(out), device.type, dtype], capture_output=True,
                             text=True)
        shutil.rmtree(out)
        if res.returncode != 0:
            rows.append({"model_gb": model_bytes / 1e9, "error": res.stderr[-2000:]})
            continue
        added, maxrss, seconds, loaded = res.stdout.split()[-4:]
        added = int(added)  # peak RSS during from_pretrained minus RSS before it (imports, CUDA context)
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        rows.append({"layers": layers, "model_bytes": model_bytes, "shard_bytes": args.shard_mb << 20,
                     "init_dtype": args.init_dtype, "loaded_model_bytes": int(loaded),
                     "loaded_over_host_memory": int(loaded) / host,
                     "host_added_bytes": added, "process_max_rss_bytes": int(maxrss),
                     "added_over_shard": added / (args.shard_mb << 20), "added_over_model": added / model_bytes,
                     "load_s": float(seconds), "device": device.type})
    return rows


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moetrain.bench.checkpoint_io", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for checkpoint_io.json")
    parser.add_argument("--scratch", type=Path, default=None, help="folder on the disk to measure (default: --out)")
    parser.add_argument("--preset", default="deepseek-moe-16b")
    parser.add_argument("--layers", type=int, default=4, help="layers of the save/load model")
    parser.add_argument("--tier", default="cpu", choices=("none", "cpu", "nvme"))
    parser.add_argument("--shard-mb", type=int, default=2048)
    parser.add_argument("--disk-gb", type=float, default=8.0)
    parser.add_argument("--init-sizes-gb", type=lambda s: [float(x) for x in s.split(",") if x], default=[8.0, 24.0])
    parser.add_argument("--skip-save", action="store_true", help="only the disk and init_from measurements")
    parser.add_argument("--init-dtype", choices=("bf16", "fp32"), default="bf16",
                        help="dtype init_from loads into (fp32: the training precision, twice the bytes on disk)")
    args = parser.parse_args(argv)
    args.scratch = (args.scratch or args.out).resolve()
    args.scratch.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": torch.cuda.get_device_name() if device.type == "cuda"
        else "cpu", "host_mem_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "command": " ".join(["python -m moetrain.bench.checkpoint_io", *(argv if argv is not None else sys.argv[1:])]),
    }
    result.update(disk_speed(args.scratch, args.disk_gb))
    if not args.skip_save:
        result["save_load"] = save_load(args, device)
    result["init_from"] = init_from_rss(args, device)
    result["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (args.out / "checkpoint_io.json").write_text(json.dumps(result, indent=2) + "\n")
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
