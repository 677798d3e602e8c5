"""Probe: why does stepping layers under backward disagree with the resident reference on CUDA when part of
the experts is stepped by CPU Adam (step_on cpu/auto), while it agrees on the CPU and with step_on gpu?

The engine refuses that combination today (``begin_micro_batch`` only steps early when the device is not
CUDA or step_on is gpu). This probe lifts that gate in a subclass and runs the same 2-layer loop-expert
training as ``tests/gpu/test_offload_cuda.py::test_layers_stepped_under_backward_equal_resident_adamw``
under variants that each remove one suspect, printing the largest weight difference from torch's AdamW:

    gated          the engine as shipped (CPU share stepped after backward): the control
    early          early steps with the CPU share in its thread (the failing case)
    early_inline   the CPU share run inline in the backward hook instead of in the thread
    early_synced   torch.cuda.synchronize() before and after each early layer step
    early_fenced   the compute stream waits for the CPU path's uploads after each early layer step

    python scripts/probe_early_cpu_step.py [--step-on auto|cpu]

It patches the engine's private methods of its time (``ExpertOffloadOptimizer._step_layer``, ``_early_lr``,
``cpu_pool``, ``_finish_cpu``), which the engine's split into parts (``offload/engine.py`` and its parts)
removed: run it on the tree it was written for (``git worktree add ../probe e2a46c2``), where it produced
benchmarks/README.md's run l1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "offload"))
from offload_harness import OPTIM, batches, clone, max_diff, tiny_model  # noqa: E402

from moetrain.offload import build_optimizer  # noqa: E402
from moetrain.offload.config import OffloadConfig  # noqa: E402
from moetrain.optim import DenseAdamW, lr_at  # noqa: E402

STEPS = 20
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU run only checks the probe itself


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def lift_gate(opt) -> None:
    cfg = opt.cfg

    def begin(index: int, count: int, lr=None) -> None:
        last = index == count - 1
        opt._early_lr = lr if last and lr is not None and cfg.max_grad_norm == 0 else None
    opt.begin_micro_batch = begin


def run(variant: str, step_on: str) -> float:
    no_clip = dataclasses.replace(OPTIM, max_grad_norm=0.0)
    base = tiny_model(num_experts=16).to(DEVICE)
    base.set_expert_impl("loop")
    data = batches(steps=STEPS)
    ref_model, model = clone(base), clone(base)
    ref = DenseAdamW(ref_model, no_clip)
    opt = build_optimizer(model, no_clip, OffloadConfig(tier="cpu", gpu_slots=4, step_on=step_on,
                                                        compute_dtype="fp32"))
    if variant != "gated":
        lift_gate(opt)
    if variant == "early_inline":
        opt.cpu_pool = None
    if variant in ("early_synced", "early_fenced"):
        inner = opt._step_layer

        def wrapped(i, counts, lr, early=False):
            if early and variant == "early_synced":
                sync()
            inner(i, counts, lr, early=early)
            if early and variant == "early_synced":
                opt._finish_cpu()
                sync()
            if early and variant == "early_fenced":
                opt._finish_cpu()
        opt._step_layer = wrapped
    for m, o in ((ref_model, ref), (model, opt)):
        for i in range(len(data) // 2):
            lr = lr_at(no_clip, i, STEPS)
            for j, ids in enumerate(data[2 * i:2 * i + 2]):
                o.begin_micro_batch(j, 2, lr)
                with torch.autocast(DEVICE, dtype=torch.bfloat16):
                    out = m(ids.to(DEVICE), labels=ids.to(DEVICE))
                (out.loss / 2).backward()
            o.clip_grad_norm_(0.0)
            o.step(lr)
            o.zero_grad()
    t = opt.telemetry()
    opt.finalize()
    sync()
    diff = max_diff(model, ref_model)
    print("RESULT " + json.dumps({"bench": "probe_early_cpu_step", "variant": variant, "step_on": step_on,
                                  "max_diff": diff, "moved": max_diff(ref_model, base),
                                  "layers_early": t.get("offload/layers_stepped_in_backward"),
                                  "cpu_experts": t.get("offload/experts_stepped_cpu"),
                                  "gpu_experts": t.get("offload/experts_stepped_gpu")}), flush=True)
    opt.close()
    return diff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-on", nargs="+", default=["cpu", "auto"])
    p.add_argument("--lockstep", action="store_true", help="compare with the reference step by step instead")
    args = p.parse_args()
    if args.lockstep:
        for step_on in args.step_on:
            for clip in (0.0, 0.5):
                for autocast in (True, False):
                    lockstep(step_on, clip, autocast)
        return
    for step_on in args.step_on:
        for variant in ("gated", "early", "early_inline", "early_synced", "early_fenced"):
            try:
                run(variant, step_on)
            except Exception as err:  # a probe: report and go on
                print("RESULT " + json.dumps({"bench": "probe_early_cpu_step", "variant": variant,
                                              "step_on": step_on, "error": repr(err)[:300]}), flush=True)



def lockstep(step_on: str = "cpu", clip: float = 0.0, autocast: bool = True) -> None:
    """The engine and the reference side by side, step by step: the first step whose gradients or weights
    differ, and which parameters (with the expert's routing counts and step number)."""
    cfg = dataclasses.replace(OPTIM, max_grad_norm=clip)
    base = tiny_model(num_experts=16).to(DEVICE)
    base.set_expert_impl("loop")
    data = batches(steps=STEPS)
    ref_model, model = clone(base), clone(base)
    ref = DenseAdamW(ref_model, cfg)
    opt = build_optimizer(model, cfg, OffloadConfig(tier="cpu", gpu_slots=4, step_on=step_on, compute_dtype="fp32"))
    reported = 0
    for i in range(len(data) // 2):
        lr = lr_at(cfg, i, STEPS)
        for m in (ref_model, model):
            for ids in data[2 * i:2 * i + 2]:
                with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
                    out = m(ids.to(DEVICE), labels=ids.to(DEVICE))
                (out.loss / 2).backward()
        ref_params = dict(ref_model.named_parameters())
        grad_diffs = []
        for n, p in model.named_parameters():
            q = ref_params[n]
            if (p.grad is None) != (q.grad is None):
                grad_diffs.append((n, "grad None on one side"))
            elif p.grad is not None and (d := (p.grad - q.grad).abs().max().item()) > 1e-6:
                grad_diffs.append((n, d))
        counts = {layer: c.tolist() for layer, c in opt.counts.items()}
        ref.clip_grad_norm_(clip)
        opt.clip_grad_norm_(clip)
        ref.step(lr)
        opt.step(lr)
        ref.zero_grad()
        opt.zero_grad()
        sync()
        weight_diffs = [(n, d) for n, p in model.named_parameters()
                        if (d := (p.detach() - ref_params[n].detach()).abs().max().item()) > 1e-6]
        if (grad_diffs or weight_diffs) and reported < 3:
            reported += 1
            print("LOCKSTEP " + json.dumps({"step_on": step_on, "clip": clip, "autocast": autocast, "step": i, "lr": lr,
                                            "grad_diffs": grad_diffs[:8], "weight_diffs": weight_diffs[:8],
                                            "counts": counts}), flush=True)
    final = max((p.detach() - q.detach()).abs().max().item()
                for p, q in zip(model.parameters(), ref_model.parameters(), strict=True))
    print("LOCKSTEP " + json.dumps({"step_on": step_on, "clip": clip, "autocast": autocast, "done": True,
                                    "reported": reported, "final_max_diff": final}), flush=True)
    opt.close()


if __name__ == "__main__":
    main()
