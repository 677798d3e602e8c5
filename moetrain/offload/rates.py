"""Rates measured at start-up and the cost model that splits active experts between the two step paths.

GPU path: an expert's 12 bytes/param of state go up and come back down (24 bytes/param over the link).
CPU path: its gradient goes down (grad bytes/param), DeepSpeed's CPU Adam steps it, and the new compute
weights go up (weight bytes/param). Both run at once, so the split balances their finishing times.
Defaults (used when nothing can be measured, e.g. no GPU) are the figures measured on the H200
machines: 55 GB/s each way, 93 GB/s both at once, DeepSpeed CPU Adam 3.98 G params/s on 16 cores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

DEFAULT_LINK_GBPS = 55.0
DEFAULT_DUPLEX_GBPS = 93.0
DEFAULT_CPU_ADAM_GPARAMS = 3.98


@dataclass
class Rates:
    """Throughputs the cost model uses (GB/s, G params/s) and whether they were measured here."""

    h2d_gbps: float = DEFAULT_LINK_GBPS
    d2h_gbps: float = DEFAULT_LINK_GBPS
    cpu_adam_gparams: float = DEFAULT_CPU_ADAM_GPARAMS
    measured: bool = False

    def gpu_path_s(self, numel: int) -> float:
        """Seconds to page an expert's state in and out (both directions overlap)."""
        return max(12 * numel / (self.h2d_gbps * 1e9), 12 * numel / (self.d2h_gbps * 1e9))

    def cpu_path_s(self, numel: int, grad_bytes: int, weight_bytes: int) -> float:
        """Seconds to send the gradient down, step on the CPU and send weights up."""
        return (grad_bytes * numel / (self.d2h_gbps * 1e9) + numel / (self.cpu_adam_gparams * 1e9)
                + weight_bytes * numel / (self.h2d_gbps * 1e9))


def measure_link(device: torch.device, nbytes: int = 64 << 20) -> tuple[float, float]:
    """Pinned host-to-device and device-to-host GB/s (CUDA only)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rates = []
    for dst, src in ((dev, host), (host, dev)):
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        rates.append(3 * nbytes / (time.perf_counter() - t0) / 1e9)
    return rates[0], rates[1]


def measure_cpu_adam(cpu_adam, numel: int = 1 << 22) -> float:
    """G params/s of ``cpu_adam`` (a :class:`~moetrain.offload.adam.CpuAdam`) on a scratch buffer."""
    bufs = [torch.zeros(numel) for _ in range(4)]
    cpu_adam.step(*bufs, step=1, lr=1e-3, weight_decay=0.0)
    t0 = time.perf_counter()
    for i in range(3):
        cpu_adam.step(*bufs, step=2 + i, lr=1e-3, weight_decay=0.0)
    return 3 * numel / (time.perf_counter() - t0) / 1e9


def measure(device: torch.device, cpu_adam=None) -> Rates:
    """Measure what this machine offers; unmeasurable rates keep their defaults."""
    rates = Rates()
    if device.type == "cuda":
        rates.h2d_gbps, rates.d2h_gbps = measure_link(device)
        rates.measured = True
    if cpu_adam is not None:
        rates.cpu_adam_gparams = measure_cpu_adam(cpu_adam)
        rates.measured = True
    return rates


def split(numels: list[int], rates: Rates, grad_bytes: int, weight_bytes: int) -> tuple[list[int], list[int]]:
    """Indices of experts for the (GPU path, CPU path), greedily balancing the two finishing times."""
    gpu_t = cpu_t = 0.0
    gpu, cpu = [], []
    for i in sorted(range(len(numels)), key=lambda i: -numels[i]):
        g = gpu_t + rates.gpu_path_s(numels[i])
        c = cpu_t + rates.cpu_path_s(numels[i], grad_bytes, weight_bytes)
        if g <= c:
            gpu.append(i)
            gpu_t = g
        else:
            cpu.append(i)
            cpu_t = c
    return sorted(gpu), sorted(cpu)
