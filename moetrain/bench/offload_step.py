"""Training-step throughput of moetrain with expert state in a given tier, on the GPU.

The model is the DeepSeek-MoE-16B layer shape of the peers' table (hidden 2048, 64 experts of width
1408, top-6, 2 shared experts, vocab 102400) with ``--layers`` MoE layers, random tokens, bf16
autocast, micro-batch ``--micro`` x ``--seq`` and ``--accum`` micro-batches per optimizer step.
One tier per process so that GPU peaks do not mix:

    python -m moetrain.bench.offload_step --tier none --out DIR
    python -m moetrain.bench.offload_step --tier cpu --out DIR
    python -m moetrain.bench.offload_step --tier cpu --master bf16_sr --moments int8 --out DIR
    python -m moetrain.bench.offload_step --full-depth --tier cpu --master bf16_sr --moments int8 \
        --micro 1 --accum 1 --out DIR     # all 28 layers of DeepSeek-MoE-16B (16.4 B parameters)

The model is built directly on the GPU (fp32), so a model larger than host memory can be built; the
engine then moves the experts' master weights into their tier and keeps bf16 compute weights.

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

from moetrain import cuda_alloc
from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.offload import build_optimizer
from moetrain.offload.config import resolve, settings_from_flat
from moetrain.offload.optim import ExpertOffloadOptimizer
from moetrain.optim import OptimizerConfig


def main(argv: list[str] | None = None) -> dict:
    cuda_alloc.apply_defaults()  # the allocator settings of `moetrain fit`, before CUDA is touched
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tier", default="none", choices=["none", "cpu", "nvme"])
    p.add_argument("--step-on", default="gpu", choices=["gpu", "cpu", "auto"])
    p.add_argument("--cpu-adam", default="exact", choices=["exact", "deepspeed"], help="the CPU share's AdamW")
    p.add_argument("--nvme-path", default=None)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--full-depth", action="store_true",
                   help="the published DeepSeek-MoE-16B depth: 28 layers, the first one dense (overrides --layers)")
    p.add_argument("--master", default="fp32", choices=["fp32", "fp32_split", "bf16_sr", "bf16_kahan"])
    p.add_argument("--moments", default="fp32", choices=["fp32", "bf16", "int8"])
    p.add_argument("--hot-cache-gb", type=float, default=0.0, help="hot-expert state cache (negative: auto)")
    p.add_argument("--gpu-budget-gb", type=float, default=4.0)
    p.add_argument("--checkpoint-layers", action="store_true",
                   help="activation checkpointing: decoder layers recomputed in backward")
    p.add_argument("--resident-weights", default="yes", choices=["yes", "no"],
                   help="no: experts' compute weights paged from host memory per layer and active expert")
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--impl", default="auto", choices=["auto", "grouped", "loop"])
    p.add_argument("--max-grad-norm", type=float, default=0.0,
                   help="global-norm clipping (0: none, as in the peers' runs; with clipping the expert step "
                        "waits for the end of backward)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, trace one more step: copy directions and compute overlap (with --out, "
                        "its Chrome trace too, host operators included)")
    p.add_argument("--cprofile", action="store_true",
                   help="profile the host side of the last step's optimizer step (cProfile): where its time goes")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("offload_step benchmark needs a CUDA device")
    if a.full_depth:
        cfg = ModelConfig.from_preset("deepseek-moe-16b")
    else:
        cfg = ModelConfig.from_preset("deepseek-moe-16b", num_hidden_layers=a.layers, first_k_dense_replace=0,
                                      name=f"deepseek-moe-16b-{a.layers}L")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    t_build = time.perf_counter()
    with torch.device(dev):
        model = MoEForCausalLM(cfg)
    model.set_expert_impl(a.impl)
    model.set_activation_checkpointing(a.checkpoint_layers)
    opt_cfg = OptimizerConfig(lr=1e-5, weight_decay=0.0, warmup_steps=0, max_grad_norm=a.max_grad_norm)
    off_cfg = resolve(settings_from_flat(tier=a.tier, step_on=a.step_on, cpu_adam=a.cpu_adam, nvme_path=a.nvme_path,
                                         master=a.master, moments=a.moments,
                                         hot_cache_gb=None if a.hot_cache_gb < 0 else a.hot_cache_gb,
                                         gpu_budget_gb=a.gpu_budget_gb, resident_weights=a.resident_weights))
    opt = build_optimizer(model, opt_cfg, off_cfg)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t_build
    load_peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"built {model.num_parameters() / 1e9:.2f} B parameters in {build_s:.1f} s "
          f"(GPU peak while building {load_peak:.1f} GiB)", flush=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []

    def one_step() -> torch.Tensor:
        for micro in range(a.accum):
            opt.begin_micro_batch(micro, a.accum, opt_cfg.lr)
            ids = torch.randint(0, cfg.vocab_size, (a.micro, a.seq), device=dev)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(ids, labels=ids, return_logits=False)
            (out.loss / a.accum).backward()
        opt.clip_grad_norm_(opt_cfg.max_grad_norm)
        if host_profile is not None:
            host_profile.enable()
        opt.step(opt_cfg.lr)
        if host_profile is not None:
            host_profile.disable()
        opt.zero_grad()
        return out.loss

    host_profile = None

    for step in range(a.steps):
        if a.cprofile and step == a.steps - 1:
            import cProfile

            host_profile = cProfile.Profile()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = one_step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        print(f"tier={a.tier} {a.master}/{a.moments} step {step} {times[-1]:.3f}s loss {losses[-1]:.4f}", flush=True)
    med = statistics.median(times[2:]) if len(times) > 2 else times[-1]
    tokens = a.micro * a.seq * a.accum
    telemetry = opt.telemetry()
    overlap = None
    if a.profile:
        from moetrain.bench.stream_overlap import profile_step

        trace = Path(a.out) / f"trace_{a.master}_{a.moments}_L{cfg.num_hidden_layers}.json.gz" if a.out else None
        if trace is not None:
            trace.parent.mkdir(parents=True, exist_ok=True)
        overlap = profile_step(one_step, trace=trace)
        traced = opt.telemetry()
        for k in ("h2d", "d2h"):  # the link rate while each direction was busy
            busy, moved = overlap[f"{k}_busy_s"], traced.get(f"offload/{k}_bytes", 0.0)
            overlap[f"{k}_gbps_while_busy"] = moved / busy / 1e9 if busy else 0.0
        overlap = {k: (round(v, 4) if isinstance(v, float) else {kk: round(vv, 4) for kk, vv in v.items()})
                   for k, v in overlap.items()}
        overlap["step_s"] = round(traced.get("offload/step_s", 0.0), 4)
        overlap["step_host_s"] = round(traced.get("offload/step_host_s", 0.0), 4)
        print("overlap of the traced step: " + json.dumps(overlap), flush=True)
    if host_profile is not None:
        host_profile.disable()
        print(host_top(host_profile), flush=True)
    store = opt.store if isinstance(opt, ExpertOffloadOptimizer) else None
    res = {
        "bench": "offload_step",
        "device": torch.cuda.get_device_name(0),
        "tier": a.tier,
        "step_on": a.step_on,
        "cpu_adam": a.cpu_adam,
        "max_grad_norm": a.max_grad_norm,
        "layers": a.layers,
        "params_B": round(model.num_parameters() / 1e9, 3),
        "tokens_per_step": tokens,
        "median_step_s": round(med, 4),
        "step_times_s": [round(t, 4) for t in times],
        "tokens_per_s": round(tokens / med),
        "gpu_peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "build_s": round(build_s, 1),
        "build_gpu_peak_GiB": round(load_peak, 2),
        "master": a.master,
        "moments": a.moments,
        "hot_cache_gb": a.hot_cache_gb,
        "resident_weights": a.resident_weights,
        "activation_checkpointing": a.checkpoint_layers,
        "gpu_budget_gb": a.gpu_budget_gb,
        "host_state_GiB": round((store.cpu_bytes if store is not None else 0) / 2**30, 2),
        "nvme_state_GiB": round((store.nvme_bytes if store is not None else 0) / 2**30, 2),
        "host_maxrss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "losses": [round(x, 4) for x in losses],
        "overlap": overlap,
        "telemetry": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in telemetry.items()
                      if isinstance(v, (int, float))},
    }
    print("RESULT " + json.dumps(res), flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        name = (f"offload_step_{a.tier}_{a.step_on}_clip{a.max_grad_norm:g}_{a.master}_{a.moments}"
                f"_hot{a.hot_cache_gb:g}_L{cfg.num_hidden_layers}"
                f"{'_paged' if a.resident_weights == 'no' else ''}{'_ckpt' if a.checkpoint_layers else ''}"
                f"_budget{a.gpu_budget_gb:g}.json")
        (Path(a.out) / name).write_text(json.dumps(res, indent=2) + "\n")
    return res


def host_top(profile, rows: int = 30) -> str:
    """The functions with the most host time of ``profile`` (a cProfile.Profile), package paths shortened."""
    import io
    import pstats

    out = io.StringIO()
    pstats.Stats(profile, stream=out).strip_dirs().sort_stats("tottime").print_stats(rows)
    return out.getvalue()


if __name__ == "__main__":
    main()
