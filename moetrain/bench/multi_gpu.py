"""Training-step throughput on 2 GPUs against 1, for the DeepSeek-MoE-16B layer shape (run on a GPU machine).

The model is ``offload_step``'s: hidden 2048, 64 routed experts of width 1408 (top-6), 2 shared experts,
vocab 102400, ``--layers`` MoE layers (4 by default; ``--layers 28`` is the full depth), random weights and
random tokens, bf16 autocast, expert state in ``--tier``. Every rank runs ``--micro`` x ``--seq`` tokens per
micro-batch and ``--accum`` micro-batches per step (weak scaling: 2 GPUs train twice the tokens of one).

One command runs the comparison (1 GPU, then 2 GPUs data parallel with partitioned expert state, then
2 GPUs expert parallel), each in its own processes, and prints one ``RESULT {json}`` line per run and a
``RESULT`` summary with ``scaling = tokens/s on 2 GPUs / (2 x tokens/s on 1)`` (target >= 0.85)::

    python -m moetrain.bench.multi_gpu --compare --layers 4 --out DIR
    python -m moetrain.bench.multi_gpu --compare --layers 28 --runs dp2,ep2 --out DIR   # full depth: 2 GPUs only

A single run, as the comparison launches it::

    torchrun --nproc_per_node=2 -m moetrain.bench.multi_gpu --ep 2 --layers 4

Per run: world size, expert-parallel size, median step seconds, global tokens/s, GPU peak (max over ranks),
host peak RSS and expert-state bytes per tier (per rank and summed), the card, the date, the command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.rope import rotary_for
from moetrain.offload.config import OffloadPlan, resolve, settings_from_flat
from moetrain.offload.optim import ExpertOffloadOptimizer, cast_experts
from moetrain.optim import OptimizerConfig, TrainOptimizer
from moetrain.parallel.config import ParallelConfig
from moetrain.parallel.layout import chunk_bounds
from moetrain.parallel.optimizer import ParallelOptimizer

RUNS = {"gpu1": (1, 1), "dp2": (2, 1), "ep2": (2, 2)}  # name: (processes, expert_parallel)


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", action="store_true", help="run --runs one after the other and print the scaling")
    p.add_argument("--runs", default="gpu1,dp2,ep2", help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--ep", type=int, default=1, help="expert_parallel of this run (under torchrun)")
    p.add_argument("--tier", default="cpu", choices=["none", "cpu", "nvme"])
    p.add_argument("--nvme-path", default=None)
    p.add_argument("--cpu-budget-gb", type=float, default=None, help="host memory for expert state per rank")
    p.add_argument("--gpu-budget-gb", type=float, default=4.0)
    p.add_argument("--master-format", dest="master", default="fp32",
                   choices=["fp32", "fp32_split", "bf16_sr", "bf16_kahan"],
                   help="master weights of offloaded experts (not --master: torchrun reserves that prefix)")
    p.add_argument("--moments", default="fp32", choices=["fp32", "bf16", "int8"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--max-grad-norm", type=float, default=0.0)
    p.add_argument("--impl", default="auto", choices=["auto", "grouped", "loop"])
    p.add_argument("--out", default=None, help="folder for one JSON file per run")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- one run
def build_model(cfg: ModelConfig, device: torch.device, ep: int, *, rank: int) -> MoEForCausalLM:
    """Random weights without an fp32 copy of all experts: built on the meta device, this rank's experts
    kept (expert parallel), experts cast to bf16, then materialised on ``device`` and initialised."""
    from moetrain.parallel.expert_parallel import apply_expert_parallel

    with torch.device("meta"):
        model = MoEForCausalLM(cfg)
    if ep > 1:
        start, stop = chunk_bounds(cfg.num_experts, ep, rank % ep)
        apply_expert_parallel(model, range(start, stop), group=None)  # the group is set by the runtime later
    cast_experts(model, torch.bfloat16)
    model = model.to_empty(device=device)
    model.model.rotary.register_buffer("inv_freq", rotary_for(cfg).inv_freq.to(device), persistent=False)
    torch.manual_seed(0)  # every rank the same dense weights (the optimizer broadcasts them anyway)
    model.reset_parameters()
    return model.train()


def run(a: argparse.Namespace) -> dict[str, Any]:
    """One measured run in this process (a rank of torchrun, or alone)."""
    from moetrain.parallel.runtime import ParallelRuntime

    if not torch.cuda.is_available():
        raise SystemExit("the multi-GPU benchmark needs CUDA devices")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl", device_id=device)
    cfg = ModelConfig.from_preset("deepseek-moe-16b", num_hidden_layers=a.layers, first_k_dense_replace=0,
                                  name=f"deepseek-moe-16b-{a.layers}L")
    model = build_model(cfg, device, a.ep if world > 1 else 1, rank=rank)
    model.set_expert_impl(a.impl)
    runtime = ParallelRuntime(ParallelConfig(expert_parallel=a.ep if world > 1 else 1))
    opt_cfg = OptimizerConfig(lr=1e-5, weight_decay=0.0, warmup_steps=0, max_grad_norm=a.max_grad_norm)
    off_cfg = resolve(settings_from_flat(tier=a.tier, nvme_path=a.nvme_path, cpu_budget_gb=a.cpu_budget_gb,
                                         gpu_budget_gb=a.gpu_budget_gb, master=a.master, moments=a.moments))
    opt = _build_optimizer(runtime, model, opt_cfg, off_cfg)
    gen = torch.Generator(device=device).manual_seed(1 + rank)  # each rank its own tokens
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(a.steps):
        torch.cuda.synchronize()
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        for micro in range(a.accum):
            opt.begin_micro_batch(micro, a.accum, opt_cfg.lr)
            ids = torch.randint(0, cfg.vocab_size, (a.micro, a.seq), device=device, generator=gen)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(ids, labels=ids, return_logits=False)
            loss = runtime.loss_for_backward(out, {"labels": ids})
            (loss / a.accum).backward()
        opt.clip_grad_norm_(opt_cfg.max_grad_norm)
        opt.step(opt_cfg.lr)
        opt.zero_grad()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(out.loss))
        if rank == 0:
            print(f"world={world} ep={a.ep} step {step} {times[-1]:.3f}s loss {losses[-1]:.4f}", flush=True)
    med = statistics.median(times[2:]) if len(times) > 2 else times[-1]
    tokens = world * a.micro * a.seq * a.accum
    inner = opt.inner if isinstance(opt, ParallelOptimizer) else opt
    store = inner.store if isinstance(inner, ExpertOffloadOptimizer) else None
    mine = {
        "gpu_peak_GiB": torch.cuda.max_memory_allocated(device) / 2**30,
        "host_maxrss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "expert_state_cpu_bytes": 0 if store is None else store.cpu_bytes,
        "expert_state_nvme_bytes": 0 if store is None else store.nvme_bytes,
        "expert_records": 0 if store is None else len(store.records),
        "median_step_s": med,
    }
    ranks = [mine]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
    telemetry = opt.telemetry()
    res = {
        "bench": "multi_gpu",
        "device": torch.cuda.get_device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m moetrain.bench.multi_gpu " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
        "world": world, "expert_parallel": a.ep if world > 1 else 1, "tier": a.tier, "layers": a.layers,
        "master": a.master, "moments": a.moments,
        "params_B_per_rank": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "tokens_per_step": tokens,
        "median_step_s": round(max(r["median_step_s"] for r in ranks), 4),
        "tokens_per_s": round(tokens / max(r["median_step_s"] for r in ranks)),
        "gpu_peak_GiB_max": round(max(r["gpu_peak_GiB"] for r in ranks), 2),
        "host_maxrss_GiB_per_rank": [round(r["host_maxrss_GiB"], 2) for r in ranks],
        "expert_state_bytes": {
            "cpu_per_rank": [r["expert_state_cpu_bytes"] for r in ranks],
            "nvme_per_rank": [r["expert_state_nvme_bytes"] for r in ranks],
            "cpu_total": sum(r["expert_state_cpu_bytes"] for r in ranks),
            "nvme_total": sum(r["expert_state_nvme_bytes"] for r in ranks),
        },
        "expert_records_per_rank": [r["expert_records"] for r in ranks],
        "losses_rank0": [round(x, 4) for x in losses],
        "telemetry_rank0": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in telemetry.items()
                            if isinstance(v, (int, float))},
    }
    if rank == 0:
        print("RESULT " + json.dumps(res), flush=True)
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            name = f"multi_gpu_w{world}_ep{res['expert_parallel']}_{a.tier}_{a.layers}L.json"
            (Path(a.out) / name).write_text(json.dumps(res, indent=2) + "\n")
    if world > 1:
        dist.destroy_process_group()
    return res


def _build_optimizer(runtime: Any, model: MoEForCausalLM, opt_cfg: OptimizerConfig,
                     off_cfg: OffloadPlan) -> TrainOptimizer:
    """The runtime's optimizer, for a model whose experts may already be split (built that way to save memory)."""
    from moetrain.parallel.expert_parallel import ExpertParallelExperts

    split = any(isinstance(b.experts, ExpertParallelExperts) for b in model.moe_blocks())
    if not split:
        return runtime.build_optimizer(model, opt_cfg, off_cfg)
    from moetrain.parallel.layout import build_layout

    runtime.layout = build_layout(model.config.num_experts, runtime.config.expert_parallel,
                                  runtime.config.partition_expert_state)
    for block in model.moe_blocks():
        block.experts.group = runtime.layout.ep_group
    return ParallelOptimizer(model, opt_cfg, off_cfg, runtime.layout)


# ---------------------------------------------------------------------------------------------- the comparison
def compare(a: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    """Each run of ``--runs`` in fresh processes (1 GPU: this interpreter; 2: torchrun); then the summary."""
    passthrough = [x for x in argv if x != "--compare" and not x.startswith("--runs")]
    if "--runs" in argv:  # "--runs X" form: drop its value too
        i = argv.index("--runs")
        passthrough = [x for j, x in enumerate(argv) if j not in (i, i + 1) and x != "--compare"]
    results: dict[str, dict[str, Any]] = {}
    for name in a.runs.split(","):
        procs, ep = RUNS[name]
        base = ["-m", "moetrain.bench.multi_gpu", *passthrough, "--ep", str(ep)]
        env = dict(os.environ)
        if procs == 1:
            cmd = [sys.executable, *base]
            env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *base]
        print("running: " + " ".join(shlex.quote(x) for x in cmd), flush=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        sys.stdout.write(done.stdout[-4000:])
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            sys.stderr.write(done.stderr[-4000:])
            results[name] = {"run": name, "failed": True, "returncode": done.returncode}
            continue
        results[name] = json.loads(lines[-1][len("RESULT "):])
    summary: dict[str, Any] = {"bench": "multi_gpu_scaling", "layers": a.layers, "tier": a.tier,
                               "tokens_per_s": {k: v.get("tokens_per_s") for k, v in results.items()}}
    one = results.get("gpu1", {}).get("tokens_per_s")
    for name in ("dp2", "ep2"):
        two = results.get(name, {}).get("tokens_per_s")
        if one and two:
            summary[f"scaling_{name}"] = round(two / (2 * one), 3)  # target >= 0.85
    print("RESULT " + json.dumps(summary), flush=True)
    return [*results.values(), summary]


def main(argv: Optional[list[str]] = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    if a.compare:
        return compare(a, argv)
    return run(a)


if __name__ == "__main__":
    main()
