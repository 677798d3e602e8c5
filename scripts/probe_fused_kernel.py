"""Probe: where the fused compressed-state AdamW kernel's time goes, on the GPU.

The kernel (``moetrain/offload/fused_step_kernels.py``) steps a DeepSeek-MoE-16B expert (8.65 M parameters,
``bf16_sr`` master + int8 moments) in some 0.25 ms where its bytes (about 87 MB read and written) would take
0.02 ms at the H200's bandwidth: it is bound by its arithmetic, not by memory. This probe times it, records
per launch (``fused_step_many_``, weight masters off), for several tile sizes and warp counts and for variants of
the kernel's source with one costly part replaced by a cheap stand-in (wrong numbers, right memory traffic), so
that the time each part costs is the difference to the kernel as it is::

    base        the kernel as shipped
    no_sr       no Philox draw for the stochastic rounding (a constant instead)
    hash_sr     the rounding's bits from a 32-bit integer hash (murmur3's finaliser) instead of Philox
    fast_div    ``a / b`` (approximate) instead of ``tl.div_rn`` (IEEE)
    fast_sqrt   ``tl.sqrt`` instead of ``tl.sqrt_rn``
    no_code     the nearest int8 code as a scaled cast, not the codebook search
    no_table    the int8 decode as a cast, not the codebook's table read
    all         every stand-in above at once: what is left is memory traffic and the launch

It prints one JSON line a configuration (ms a record, GB/s of bytes touched, the compiled kernel's registers and
spills) and the fastest::

    python scripts/probe_fused_kernel.py --records 32
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from moetrain.bench.fused_step import bytes_per_record, make_records
from moetrain.offload import fused_step
from moetrain.optim import OptimizerConfig

VARIANTS = {
    "base": [],
    "no_sr": [("tl.randint(seed, e)", "(e * 0 + 0x8000)")],
    "hash_sr": [("tl.randint(seed, e)", "_hash_bits(seed, e)")],
    "fast_div": [("tl.div_rn(", "_fast_div(")],
    "fast_sqrt": [("tl.sqrt_rn(", "tl.sqrt(")],
    "no_code": [("q = _nearest_code(normed, mids_ptr, STEPS, PW0, ZERO, LAST)",
                 "q = (normed * 127.0 + 127.0).to(tl.int32)")],
    "no_table": [("tl.load(table_ptr + q_m)", "q_m.to(tl.float32)"),
                 ("tl.load(table_ptr + 512 + q_v)", "q_v.to(tl.float32)")],
}
VARIANTS["all"] = [pair for name in ("no_sr", "fast_div", "fast_sqrt", "no_code", "no_table")
                   for pair in VARIANTS[name]]
"""Each variant's textual replacements in the kernels' source (the first string must occur)."""

HASH_BITS = '''

@triton.jit
def _hash_bits(seed, e):
    key = (seed ^ (seed >> 32)).to(tl.uint32)
    x = e.to(tl.uint32) * 0x9E3779B1 + key
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x
'''

FAST_DIV = '''

@triton.jit
def _fast_div(a, b):
    return a / b
'''


def variant_module(name: str, workdir: Path, original):
    """The kernels' module (``original``) with ``VARIANTS[name]`` applied, imported from a file (Triton reads jit
    sources)."""
    source = inspect.getsource(original)
    for old, new in VARIANTS[name]:
        assert old in source, f"{name}: {old!r} not in the kernel source"
        source = source.replace(old, new)
    head = "\n\n@triton.jit\ndef _nearest_code("
    source = source.replace(head, FAST_DIV + HASH_BITS + head, 1)
    path = workdir / f"kernels_{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"fused_kernels_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compiled_stats(module) -> dict:
    """Registers and spills of the module's compiled record kernel (the last one compiled)."""
    kernel = module._adamw_record_kernel
    for cache in getattr(kernel, "device_caches", {}).values():
        compiled = list(cache[0].values()) if isinstance(cache, tuple) else list(cache.values())
        if compiled:
            last = compiled[-1]
            return {"n_regs": getattr(last, "n_regs", None), "n_spills": getattr(last, "n_spills", None)}
    return {}


def time_variant(module, pairs, cfg: OptimizerConfig, grad_scale: torch.Tensor, reps: int) -> float:
    """Median seconds of one fused step of every record in ``pairs`` with ``module``'s kernels."""
    sys.modules[fused_step.KERNELS] = module  # fused_step_many_ looks the kernels' module up there
    times = []
    for i in range(reps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fused_step.fused_step_many_(pairs, steps=[2] * len(pairs), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    cfg=cfg, grad_scale=grad_scale)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tiles", default="512,1024,2048")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--formats", default="bf16_sr:int8", help="master:moments pairs, comma-separated")
    a = p.parse_args()
    dev = torch.device("cuda")
    cfg = OptimizerConfig(lr=1e-5, weight_decay=0.1)
    grad_scale = torch.tensor(1.25, device=dev)
    original = importlib.import_module(fused_step.KERNELS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        modules = {name: original if name == "base" else variant_module(name, Path(tmp), original)
                   for name in a.variants.split(",")}
        for spec in a.formats.split(","):
            master, moments = spec.split(":")
            pairs = make_records(a.records, master, moments, block=256, device=dev)
            touched = bytes_per_record(pairs[0][0].layout) * a.records
            for name, module in modules.items():
                if name in ("no_sr", "hash_sr") and master != "bf16_sr":
                    continue
                for tile in (int(t) for t in a.tiles.split(",")):
                    for warps in (int(w) for w in a.warps.split(",")):
                        fused_step.TILE, fused_step.NUM_WARPS = tile, warps
                        fused_step.RECORDS_PER_LAUNCH = 16
                        seconds = time_variant(module, pairs, cfg, grad_scale, a.reps)
                        row = {"format": spec, "variant": name, "tile": tile, "warps": warps,
                               "ms_per_record": round(seconds / a.records * 1e3, 4),
                               "GBps": round(touched / seconds / 1e9, 1)} | compiled_stats(module)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
            del pairs
            torch.cuda.empty_cache()
    sys.modules[fused_step.KERNELS] = original
    for spec in a.formats.split(","):
        base = [r for r in rows if r["variant"] == "base" and r["format"] == spec]
        best = min(base, key=lambda r: r["ms_per_record"])
        print("BEST " + json.dumps(best), flush=True)


if __name__ == "__main__":
    main()
