"""Rates measured at start-up and the cost model that splits active experts between the two step paths.

GPU path: an expert's 12 bytes/param of state go up and come back down (12 bytes/param each way; a
cached slot skips the way up, which the model ignores). CPU path: its gradient goes down (grad
bytes/param, 2 in bf16), the host upcasts it, DeepSpeed's CPU Adam steps it and the new weights are cast
back (the rate measured here covers those three), and the weights go up (weight bytes/param). The two
paths run at once and share the link, so the step ends at max(link time of all bytes, CPU time); the
split puts each expert where that maximum grows least.
Defaults (used when nothing can be measured, e.g. no GPU) are the figures measured on the H200
machines: 55 GB/s each way, 93 GB/s both at once (101 on some cards), DeepSpeed CPU Adam 3.98 G params/s on 16 cores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

DEFAULT_LINK_GBPS = 55.0
DEFAULT_DUPLEX_GBPS = 93.0
DEFAULT_CPU_ADAM_GPARAMS = 3.98
GPU_PATH_BYTES = 12  # fp32 master + exp_avg + exp_avg_sq per parameter, each way


@dataclass
class Rates:
    """Throughputs the cost model uses (GB/s, G params/s) and whether they were measured here."""

    h2d_gbps: float = DEFAULT_LINK_GBPS
    d2h_gbps: float = DEFAULT_LINK_GBPS
    cpu_adam_gparams: float = DEFAULT_CPU_ADAM_GPARAMS
    measured: bool = False
    duplex_gbps: float = DEFAULT_DUPLEX_GBPS  # both directions at once, total

    def link_s(self, up_bytes: float, down_bytes: float) -> float:
        """Seconds to move ``up_bytes`` host-to-device and ``down_bytes`` back, both queued at once."""
        return max(up_bytes / (self.h2d_gbps * 1e9), down_bytes / (self.d2h_gbps * 1e9),
                   (up_bytes + down_bytes) / (self.duplex_gbps * 1e9))

    def gpu_path_s(self, numel: int) -> float:
        """Seconds to page an expert's state in and out (both directions overlap)."""
        return self.link_s(GPU_PATH_BYTES * numel, GPU_PATH_BYTES * numel)

    def cpu_path_s(self, numel: int, grad_bytes: int, weight_bytes: int) -> float:
        """Seconds of an expert alone on the CPU path (its copies and the host work are pipelined)."""
        return max(self.link_s(weight_bytes * numel, grad_bytes * numel), numel / (self.cpu_adam_gparams * 1e9))


def measure_link(device: torch.device, nbytes: int = 64 << 20) -> tuple[float, float, float]:
    """Pinned host-to-device, device-to-host and both-at-once (total) GB/s (CUDA only)."""
    hosts = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    devs = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
    streams = [torch.cuda.Stream(device) for _ in range(2)]
    pairs = ((devs[0], hosts[0]), (hosts[1], devs[1]))
    rates = []
    for chosen in ((0,), (1,), (0, 1)):
        for _ in range(2):  # warm-up, then timed
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for i in chosen:
                with torch.cuda.stream(streams[i]):
                    for _ in range(3):
                        pairs[i][0].copy_(pairs[i][1], non_blocking=True)
            torch.cuda.synchronize(device)
        rates.append(3 * nbytes * len(chosen) / (time.perf_counter() - t0) / 1e9)
    return rates[0], rates[1], rates[2]


def measure_cpu_adam(cpu_adam, numel: int = 1 << 24, dtype: torch.dtype = torch.bfloat16) -> float:
    """G params/s of the CPU path's host work per parameter: upcast a ``dtype`` gradient, one step of
    ``cpu_adam`` (a :class:`~moetrain.offload.adam.CpuAdam`), cast the new weight to ``dtype``. The buffers
    (16M params, 4 x 64 MiB of fp32) are larger than caches, as an expert's state is."""
    master, exp_avg, exp_avg_sq, grad32 = (torch.zeros(numel) for _ in range(4))
    grad, weight = torch.zeros(numel, dtype=dtype), torch.empty(numel, dtype=dtype)

    def once(step: int) -> None:
        grad32.copy_(grad)
        cpu_adam.step(master, grad32, exp_avg, exp_avg_sq, step=step, lr=1e-3, weight_decay=0.0)
        weight.copy_(master)

    once(1)
    t0 = time.perf_counter()
    for i in range(3):
        once(2 + i)
    return 3 * numel / (time.perf_counter() - t0) / 1e9


def measure(device: torch.device, cpu_adam=None, dtype: torch.dtype = torch.bfloat16) -> Rates:
    """Measure what this machine offers; unmeasurable rates keep their defaults."""
    rates = Rates()
    if device.type == "cuda":
        rates.h2d_gbps, rates.d2h_gbps, rates.duplex_gbps = measure_link(device)
        rates.measured = True
    if cpu_adam is not None:
        rates.cpu_adam_gparams = measure_cpu_adam(cpu_adam, dtype=dtype)
        rates.measured = True
    return rates


def split(numels: list[int], rates: Rates, grad_bytes: int, weight_bytes: int) -> tuple[list[int], list[int]]:
    """Indices of experts for the (GPU path, CPU path): each expert, largest first, goes where the step's
    finishing time max(link time of every byte queued, CPU time) grows least (ties to the GPU)."""
    up = down = cpu_s = 0.0
    gpu, cpu = [], []
    for i in sorted(range(len(numels)), key=lambda i: -numels[i]):
        n = numels[i]
        g = max(rates.link_s(up + GPU_PATH_BYTES * n, down + GPU_PATH_BYTES * n), cpu_s)
        c_cpu = cpu_s + n / (rates.cpu_adam_gparams * 1e9)
        c = max(rates.link_s(up + weight_bytes * n, down + grad_bytes * n), c_cpu)
        if g <= c:
            gpu.append(i)
            up, down = up + GPU_PATH_BYTES * n, down + GPU_PATH_BYTES * n
        else:
            cpu.append(i)
            up, down, cpu_s = up + weight_bytes * n, down + grad_bytes * n, c_cpu
    return sorted(gpu), sorted(cpu)
