"""Training-step throughput of moetrain with expert state in a given tier, on the GPU.

The model is the DeepSeek-MoE-16B layer shape of the peers' table (hidden 2048, 64 experts of width
1408, top-6, 2 shared experts, vocab 102400) with ``--layers`` MoE layers, random tokens, bf16
autocast, micro-batch ``--micro`` x ``--seq`` and ``--accum`` micro-batches per optimizer step.
One tier per process so that GPU peaks do not mix:

    python -m moetrain.bench.offload_step --tier none --out DIR
    python -m moetrain.bench.offload_step --tier cpu --out DIR

Writes ``offload_step_<tier>.json``: median step seconds, tokens/s, GPU peak, host peak RSS and the
engine's telemetry of the last step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig
from moetrain.training.optim import OptimizerConfig


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tier", default="none", choices=["none", "cpu", "nvme"])
    p.add_argument("--step-on", default="gpu", choices=["gpu", "cpu", "auto"])
    p.add_argument("--nvme-path", default=None)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--impl", default="auto", choices=["auto", "grouped", "loop"])
    p.add_argument("--max-grad-norm", type=float, default=0.0,
                   help="global-norm clipping (0: none, as in the peers' runs; with clipping the expert step "
                        "waits for the end of backward)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("offload_step benchmark needs a CUDA device")
    cfg = ModelConfig.from_preset("deepseek-moe-16b", num_hidden_layers=a.layers, first_k_dense_replace=0,
                                  name=f"deepseek-moe-16b-{a.layers}L")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = MoEForCausalLM(cfg).to(dev)
    model.set_expert_impl(a.impl)
    opt_cfg = OptimizerConfig(lr=1e-5, weight_decay=0.0, warmup_steps=0, max_grad_norm=a.max_grad_norm)
    off_cfg = OffloadConfig(tier=a.tier, step_on=a.step_on, nvme_path=a.nvme_path)
    opt = build_optimizer(model, opt_cfg, off_cfg)
    begin = getattr(opt, "begin_micro_batch", None)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for micro in range(a.accum):
            if begin is not None:
                begin(micro, a.accum, opt_cfg.lr)
            ids = torch.randint(0, cfg.vocab_size, (a.micro, a.seq), device=dev)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(ids, labels=ids, return_logits=False)
            (out.loss / a.accum).backward()
        opt.clip_grad_norm_(opt_cfg.max_grad_norm)
        opt.step(opt_cfg.lr)
        opt.zero_grad()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(out.loss))
        print(f"tier={a.tier} step {step} {times[-1]:.3f}s loss {losses[-1]:.4f}", flush=True)
    med = statistics.median(times[2:]) if len(times) > 2 else times[-1]
    tokens = a.micro * a.seq * a.accum
    telemetry = opt.telemetry() if hasattr(opt, "telemetry") else {}
    res = {
        "bench": "offload_step",
        "device": torch.cuda.get_device_name(0),
        "tier": a.tier,
        "step_on": a.step_on,
        "max_grad_norm": a.max_grad_norm,
        "layers": a.layers,
        "params_B": round(model.num_parameters() / 1e9, 3),
        "tokens_per_step": tokens,
        "median_step_s": round(med, 4),
        "tokens_per_s": round(tokens / med),
        "gpu_peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "host_maxrss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "losses": [round(x, 4) for x in losses],
        "telemetry": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in telemetry.items()
                      if isinstance(v, (int, float))},
    }
    print("RESULT " + json.dumps(res), flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        name = f"offload_step_{a.tier}_{a.step_on}_clip{a.max_grad_norm:g}.json"
        (Path(a.out) / name).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
