"""Expert optimizer step per record on the GPU: the fused Triton kernel against the unfused path (decode to fp32,
torch's fused AdamW, encode), at the DeepSeek-MoE-16B expert shape (3 x 2048 x 1408, bf16 gradients).

    python -m moetrain.bench.fused_step --records 64 --out DIR

For each format (``bf16_sr`` + ``int8`` and ``fp32`` + ``int8`` by default) ``--records`` records sit in device
memory, as in the engine's slots, each with its own parameters and bf16 gradients; both paths step all of them
``--reps`` times (after one warm-up step that compiles the kernel), with gradient clipping's ``grad_scale`` unless
``--no-clip``, and write the new compute weights, as ``GpuStep`` does. Prints one ``RESULT {json}`` line and writes
``fused_step.json``: per format, ms per record each way, the speedup, and GB/s of bytes touched (the record read
and written, the gradients read, the bf16 compute weights written), plus the largest difference of the decoded
masters after one step of each path from the same state (fp32 master: an ulp or so, now and then an int8 code step
of a moment; bf16_sr: a bf16 spacing, the two paths draw different rounding bits).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from moetrain.offload.compute_weights import WeightWriter
from moetrain.offload.fused_step import fused_step_available, triton_importable
from moetrain.offload.gpu_step import GpuStep
from moetrain.offload.state_format import StateCodec, StateLayout
from moetrain.offload.store import ExpertRecord
from moetrain.optim import OptimizerConfig

SHAPES = [torch.Size((1408, 2048)), torch.Size((1408, 2048)), torch.Size((2048, 1408))]
"""gate_proj, up_proj, down_proj of a DeepSeek-MoE-16B routed expert (hidden 2048, width 1408)."""


def make_records(count: int, master: str, moments: str, *, block: int, device: torch.device,
                 seed: int = 0) -> list[tuple[ExpertRecord, torch.Tensor]]:
    """``count`` (record, its bytes on ``device``): weights ~ N(0, 0.02), moments of an earlier step, bf16 parameters
    with bf16 gradients ~ N(0, 1e-3); one encoded state copied into every record."""
    layout = StateLayout(tuple(s.numel() for s in SHAPES), master, moments, block)
    codec = StateCodec(layout)
    n = layout.numel
    padded = -(-layout.nbytes // 4)
    g = torch.Generator(device=device).manual_seed(seed)
    first = torch.zeros(padded, device=device)
    earlier = torch.randn(n, device=device, generator=g) * 1e-3
    codec.encode(first, master=torch.randn(n, device=device, generator=g) * 0.02, exp_avg=0.1 * earlier,
                 exp_avg_sq=0.05 * earlier * earlier, generator=None)
    del earlier
    out = []
    for i in range(count):
        params = []
        for shape in SHAPES:
            p = torch.nn.Parameter(torch.empty(shape, dtype=torch.bfloat16, device=device))
            p.grad = (torch.randn(shape, device=device, generator=g) * 1e-3).bfloat16()
            params.append(p)
        names = [f"expert{i}.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
        rec = ExpertRecord(layer=0, expert=i, prefix=f"expert{i}", params=params, names=names, numel=n, padded=padded,
                           step=1, shapes=list(SHAPES), layout=layout, codec=codec)
        out.append((rec, first.clone()))
    return out


def time_path(stepper: GpuStep, pairs: list, *, fused: bool, reps: int, lr: float,
              grad_scale: torch.Tensor | None) -> float:
    """Median seconds of one step of every record in ``pairs`` by one path (a warm-up step first)."""
    times = []
    for i in range(reps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if fused:
            stepper.step_fused(pairs, lr, grad_scale=grad_scale)
        else:
            clip_coef = None if grad_scale is None else 1.0 / grad_scale
            stepper.step_unfused(pairs, lr, clip_coef=clip_coef, grad_scale=grad_scale)
        torch.cuda.synchronize()
        if i:  # the first compiles the kernel and warms the allocator
            times.append(time.perf_counter() - t0)
        for rec, _ in pairs:
            rec.step += 1
    return statistics.median(times)


def master_difference(stepper: GpuStep, pairs: list, *, lr: float, grad_scale: torch.Tensor | None) -> float:
    """Largest |difference| of the decoded masters after one step of each path from the same state (one record)."""
    rec, flat = pairs[0]
    copies = [flat.clone(), flat.clone()]
    stepper.step_fused([(rec, copies[0])], lr, grad_scale=grad_scale)
    clip_coef = None if grad_scale is None else 1.0 / grad_scale
    stepper.step_unfused([(rec, copies[1])], lr, clip_coef=clip_coef, grad_scale=grad_scale)
    masters = [rec.codec.decode_master(c) for c in copies]
    return float((masters[0] - masters[1]).abs().max())


def bytes_per_record(layout: StateLayout) -> int:
    """Bytes a step touches: the record read and written, bf16 gradients read, bf16 compute weights written."""
    return 2 * layout.nbytes + 2 * layout.numel + 2 * layout.numel


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--formats", default="bf16_sr:int8,fp32:int8", help="master:moments pairs, comma-separated")
    p.add_argument("--block", type=int, default=256, help="int8 quantization block")
    p.add_argument("--scratch-gb", type=float, default=1.0,
                   help="the unfused path's fp32 scratch per group (the engine: a quarter of gpu_budget_gb)")
    p.add_argument("--no-clip", action="store_true", help="no grad_scale (no gradient clipping)")
    p.add_argument("--tile", type=int, default=None, help="the kernel's elements per program (fused_step.TILE)")
    p.add_argument("--num-warps", type=int, default=None, help="the kernel's warps per program")
    p.add_argument("--records-per-launch", type=int, default=None,
                   help="records one launch steps at most (fused_step.RECORDS_PER_LAUNCH; 1: a launch a record)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fused_step benchmark needs a CUDA device")
    if not triton_importable():
        raise SystemExit("fused_step benchmark needs triton")
    from moetrain.offload import fused_step

    if a.tile:
        fused_step.TILE = a.tile
    if a.num_warps:
        fused_step.NUM_WARPS = a.num_warps
    if a.records_per_launch:
        fused_step.RECORDS_PER_LAUNCH = a.records_per_launch
    dev = torch.device("cuda")
    cfg = OptimizerConfig(lr=1e-5, weight_decay=0.1)
    stepper = GpuStep(None, cfg, WeightWriter(None), compressed=True, scratch_bytes=a.scratch_gb * 2**30)
    grad_scale = None if a.no_clip else torch.tensor(1.25, device=dev)
    formats = {}
    for spec in a.formats.split(","):
        master, moments = spec.split(":")
        pairs = make_records(a.records, master, moments, block=a.block, device=dev)
        layout = pairs[0][0].layout
        if not fused_step_available(layout, dev):
            raise SystemExit(f"the fused kernel does not take {master}+{moments} (or MOETRAIN_FUSED_STEP=0)")
        fused_s = time_path(stepper, pairs, fused=True, reps=a.reps, lr=cfg.lr, grad_scale=grad_scale)
        unfused_s = time_path(stepper, pairs, fused=False, reps=a.reps, lr=cfg.lr, grad_scale=grad_scale)
        touched = bytes_per_record(layout) * a.records
        formats[f"{master}+{moments}"] = {
            "fused_ms_per_record": round(fused_s / a.records * 1e3, 4),
            "unfused_ms_per_record": round(unfused_s / a.records * 1e3, 4),
            "speedup": round(unfused_s / fused_s, 2),
            "fused_GBps": round(touched / fused_s / 1e9, 1),
            "unfused_GBps": round(touched / unfused_s / 1e9, 1),
            "bytes_per_record": bytes_per_record(layout),
            "max_abs_master_diff_one_step": master_difference(stepper, pairs, lr=cfg.lr, grad_scale=grad_scale),
        }
        print(f"{master}+{moments}: " + json.dumps(formats[f"{master}+{moments}"]), flush=True)
        del pairs
        torch.cuda.empty_cache()
    res = {"bench": "fused_step", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "triton": _triton_version(), "records": a.records, "reps": a.reps, "block": a.block,
           "tile": fused_step.TILE, "num_warps": fused_step.NUM_WARPS,
           "records_per_launch": fused_step.RECORDS_PER_LAUNCH, "grad_scale": grad_scale is not None,
           "formats": formats}
    print("RESULT " + json.dumps(res), flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "fused_step.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    main()
