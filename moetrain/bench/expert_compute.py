"""Forward+backward throughput of one MoE layer: the grouped-GEMM expert path against the
per-expert loop, at a preset's layer shape (default: DeepSeek-MoE-16B, 64 experts of width 1408,
top-6, 2 shared experts, hidden 2048).

    python -m moetrain.bench.expert_compute --preset deepseek-moe-16b --tokens 8192 --out DIR

Prints and writes ``expert_compute.json``: median seconds and tokens/s per path, their ratio, and
the max difference between the two paths' outputs and gradients (bf16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from moetrain.config import ModelConfig
from moetrain.models.moe import MoEBlock


def time_path(block: MoEBlock, x: torch.Tensor, impl: str, *, reps: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Median seconds of forward+backward with ``impl``; also the output and the input grad."""
    block.experts.impl = impl
    times = []
    for i in range(reps + 2):
        xi = x.detach().requires_grad_()
        block.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, routing = block(xi)
        (out.float().square().mean() + routing.aux_loss).backward()
        torch.cuda.synchronize()
        if i >= 2:  # the first two warm up kernels and packing
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out.detach().float(), xi.grad.detach().float()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="deepseek-moe-16b")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per forward (micro-batch 4 x 2048)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("expert_compute benchmark needs a CUDA device")
    cfg = ModelConfig.from_preset(a.preset)
    layer = cfg.moe_layers[0]
    torch.manual_seed(0)
    block = MoEBlock(cfg, layer).cuda()
    for prm in block.parameters():
        torch.nn.init.normal_(prm, std=0.02)
    x = torch.randn(a.tokens // 2048 or 1, min(a.tokens, 2048), cfg.hidden_size, device="cuda")
    t_loop, y_loop, g_loop = time_path(block, x, "loop", reps=a.reps)
    t_grp, y_grp, g_grp = time_path(block, x, "grouped", reps=a.reps)
    res = {
        "bench": "expert_compute",
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "preset": a.preset,
        "tokens": x.shape[0] * x.shape[1],
        "experts": cfg.num_experts,
        "top_k": cfg.num_experts_per_tok,
        "loop_fwd_bwd_s": round(t_loop, 5),
        "grouped_fwd_bwd_s": round(t_grp, 5),
        "loop_tokens_per_s": round(x.shape[0] * x.shape[1] / t_loop),
        "grouped_tokens_per_s": round(x.shape[0] * x.shape[1] / t_grp),
        "speedup_grouped_over_loop": round(t_loop / t_grp, 2),
        "max_abs_out_diff": float((y_loop - y_grp).abs().max()),
        "max_abs_grad_diff": float((g_loop - g_grp).abs().max()),
        "out_scale": float(y_loop.abs().max()),
    }
    print("RESULT " + json.dumps(res), flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "expert_compute.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
