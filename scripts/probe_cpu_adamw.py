"""Probe: the CPU AdamW kernels against torch's fused CUDA AdamW (the resident reference's kernel), and their speed.

For each CPU kernel, ten fp32 AdamW steps (lr 1e-2, weight decay 0.1, betas 0.9/0.95) of 4M parameters next to
the CUDA kernel, printing per step how many elements differ and the largest difference; then each kernel's rate
(G params/s, in-place fp32, 32M parameters: larger than caches) with torch's thread count::

    deepspeed        DeepSpeed's vectorised cpu_adam (the CPU share's kernel before adam_cuda_order)
    cuda_order       moetrain.offload.adam_cuda_order (the kernel's fp32 operations in its order, the device's
                     bias corrections): what the CPU share runs
    host_powf        the same with the bias corrections from the host's powf
    unfused_decay    the same, with the decay's product rounded before its subtraction (what nvcc would do
                     without contracting ``p -= lr * wd * p`` into one fma)

    python scripts/probe_cpu_adamw.py
"""

from __future__ import annotations

import json
import time

import torch

from moetrain.offload.adam import CpuAdam, fused_adamw, step_tensors
from moetrain.offload.adam_cuda_order import CudaOrderCpuAdam
from moetrain.optim import OptimizerConfig

CFG = OptimizerConfig(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def kernels() -> dict:
    return {"deepspeed": CpuAdam(CFG), "cuda_order": CudaOrderCpuAdam(CFG, device="cuda"),
            "host_powf": CudaOrderCpuAdam(CFG),
            "unfused_decay": CudaOrderCpuAdam(CFG, device="cuda", defines=("ADAMW_DECAY_UNFUSED",))}


def agreement(name: str, adam, n: int = 1 << 22) -> None:
    gen = torch.Generator().manual_seed(0)
    host = [torch.randn(n, generator=gen), torch.zeros(n), torch.zeros(n)]
    dev = [t.cuda() for t in host]
    for step in range(1, 11):
        g = torch.randn(n, generator=gen)
        adam.step(host[0], g, host[1], host[2], step=step, lr=CFG.lr, weight_decay=CFG.weight_decay)
        fused_adamw([dev[0]], [g.cuda()], [dev[1]], [dev[2]], steps=step_tensors([step], dev[0].device), lr=CFG.lr,
                    weight_decay=CFG.weight_decay, cfg=CFG)
        p = dev[0].cpu()
        print("AGREE " + json.dumps({"kernel": name, "step": step, "param_differ": int((host[0] != p).sum()),
                                     "param_max": float((host[0] - p).abs().max()),
                                     "exp_avg_differ": int((host[1] != dev[1].cpu()).sum()),
                                     "exp_avg_sq_differ": int((host[2] != dev[2].cpu()).sum())}), flush=True)


def rate(name: str, adam, n: int = 1 << 25) -> None:
    p, g, m, v = torch.randn(n), torch.randn(n), torch.zeros(n), torch.zeros(n)
    adam.step(p, g, m, v, step=1, lr=1e-3, weight_decay=0.1)
    t0 = time.perf_counter()
    for step in range(2, 7):
        adam.step(p, g, m, v, step=step, lr=1e-3, weight_decay=0.1)
    gps = 5 * n / (time.perf_counter() - t0) / 1e9
    print("RATE " + json.dumps({"kernel": name, "gparams_per_s": round(gps, 3), "threads": torch.get_num_threads()}),
          flush=True)


def main() -> None:
    found = kernels()
    for name, adam in found.items():
        agreement(name, adam)
    for name, adam in found.items():
        rate(name, adam)


if __name__ == "__main__":
    main()
