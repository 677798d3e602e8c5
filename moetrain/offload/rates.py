"""Rates measured at start-up and the cost model that splits active experts between the two step paths.

GPU path: an expert's stored state goes up and comes back down (``state_bytes`` a parameter each way: 12
for fp32 state, 4.03 for bf16_sr masters with int8 moments; a cached slot skips the way up, which the
model ignores). CPU path: its gradient goes down (grad bytes/param, 2 in bf16), the host upcasts it,
decodes the stored state (compressed formats: dequantize, widen), the CPU share's AdamW steps it, the
state is encoded back (quantize, round) and the new weights are cast (the rate measured here covers all of
that, with the store's own format), and the weights go up (weight bytes/param). The two paths run at once
and share the link, so the step ends at max(link time of all bytes, CPU time); the split puts each expert
where that maximum grows least. Compressed state makes the GPU path cheaper (fewer bytes) and the CPU path
dearer (the codec runs on the host), so auto sends more experts to the GPU.
Defaults (used when nothing can be measured, e.g. no GPU) are the figures measured on the H200
machines: 55 GB/s each way, 93 GB/s both at once (101 on some cards), DeepSpeed CPU Adam 3.98 G params/s on 16 cores
(the exact kernel, ``cpu_adam: exact``, measured 3.1 and 4.3 in runs r26 and r27, DeepSpeed's 4.2 and 4.4 beside it).
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
    state_bytes: float = GPU_PATH_BYTES  # stored state per parameter, each way on the GPU path

    def link_s(self, up_bytes: float, down_bytes: float) -> float:
        """Seconds to move ``up_bytes`` host-to-device and ``down_bytes`` back, both queued at once."""
        return max(up_bytes / (self.h2d_gbps * 1e9), down_bytes / (self.d2h_gbps * 1e9),
                   (up_bytes + down_bytes) / (self.duplex_gbps * 1e9))

    def gpu_path_s(self, numel: int) -> float:
        """Seconds to page an expert's state in and out (both directions overlap)."""
        return self.link_s(self.state_bytes * numel, self.state_bytes * numel)

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


def measure_cpu_adam(cpu_adam, numel: int = 1 << 24, dtype: torch.dtype = torch.bfloat16, *, codec=None) -> float:
    """G params/s of the CPU path's host work per parameter: upcast a ``dtype`` gradient, decode the state,
    one step of ``cpu_adam`` (:mod:`~moetrain.offload.adam_cuda_order` or DeepSpeed's), encode the state back and
    cast the new weight to ``dtype``, as :class:`~moetrain.offload.cpu_step.CpuStepper` does for a record.

    ``codec``: a record's :class:`~moetrain.offload.state_format.StateCodec` (the store's format; its
    layout's size is what is timed, repeated to about ``numel`` parameters); None times fp32 state in place
    over ``numel`` parameters. The buffers (16M params, 4 x 64 MiB of fp32) are larger than caches, as an
    expert's state is."""
    if codec is None:
        master, exp_avg, exp_avg_sq, grad32 = (torch.zeros(numel) for _ in range(4))
        grad, weight = torch.zeros(numel, dtype=dtype), torch.empty(numel, dtype=dtype)

        def once(step: int) -> int:
            grad32.copy_(grad)
            cpu_adam.step(master, grad32, exp_avg, exp_avg_sq, step=step, lr=1e-3, weight_decay=0.0)
            weight.copy_(master)
            return numel
    else:
        n = codec.layout.numel
        copies = max(1, min(numel // n, 16))  # records of the real size; a few of them for a small model
        flats = [torch.zeros((codec.layout.nbytes + 3) // 4, dtype=torch.float32) for _ in range(copies)]
        for flat in flats:  # a valid record: zero master and moments in the store's format
            codec.encode(flat, master=torch.zeros(n), exp_avg=torch.zeros(n), exp_avg_sq=torch.zeros(n))
        grad32, grad, weight = torch.zeros(n), torch.zeros(n, dtype=dtype), torch.empty(n, dtype=dtype)

        def once(step: int) -> int:
            for k, flat in enumerate(flats):
                grad32.copy_(grad)
                master, exp_avg, exp_avg_sq = codec.decode(flat)
                cpu_adam.step(master, grad32, exp_avg, exp_avg_sq, step=step, lr=1e-3, weight_decay=0.0)
                generator = codec.record_generator(flat.device, k + step)
                codec.encode(flat, master=master, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, generator=generator)
                weight.copy_(codec.compute_weights(flat, master))
            return n * len(flats)

    once(1)
    t0 = time.perf_counter()
    done = sum(once(2 + i) for i in range(3))
    return done / (time.perf_counter() - t0) / 1e9


def measure(device: torch.device, cpu_adam=None, dtype: torch.dtype = torch.bfloat16, *, codec=None,
            state_bytes: float = GPU_PATH_BYTES) -> Rates:
    """Measure what this machine offers; unmeasurable rates keep their defaults.

    ``codec``: the store's state format (see :func:`measure_cpu_adam`); ``state_bytes``: its bytes per
    parameter, what the GPU path moves each way."""
    rates = Rates(state_bytes=state_bytes)
    if device.type == "cuda":
        rates.h2d_gbps, rates.d2h_gbps, rates.duplex_gbps = measure_link(device)
        rates.measured = True
    if cpu_adam is not None:
        rates.cpu_adam_gparams = measure_cpu_adam(cpu_adam, dtype=dtype, codec=codec)
        rates.measured = True
    return rates


def split(numels: list[int], rates: Rates, *, grad_bytes: int, weight_bytes: int) -> tuple[list[int], list[int]]:
    """Indices of experts for the (GPU path, CPU path): each expert, largest first, goes where the step's
    finishing time max(link time of every byte queued, CPU time) grows least (ties to the GPU)."""
    up = down = cpu_s = 0.0
    gpu, cpu = [], []
    for i in sorted(range(len(numels)), key=lambda i: -numels[i]):
        n = numels[i]
        g = max(rates.link_s(up + rates.state_bytes * n, down + rates.state_bytes * n), cpu_s)
        c_cpu = cpu_s + n / (rates.cpu_adam_gparams * 1e9)
        c = max(rates.link_s(up + weight_bytes * n, down + grad_bytes * n), c_cpu)
        if g <= c:
            gpu.append(i)
            up, down = up + rates.state_bytes * n, down + rates.state_bytes * n
        else:
            cpu.append(i)
            up, down, cpu_s = up + weight_bytes * n, down + grad_bytes * n, c_cpu
    return sorted(gpu), sorted(cpu)


def split_records(recs: list, *, step_on: str, hot: set, rates: Rates) -> tuple[list, list]:
    """(GPU share, CPU share) of the expert records ``recs`` under ``step_on``: hot-cached records are stepped
    where they are (GPU); ``cpu`` sends the rest to the CPU; ``auto`` splits them by ``rates`` (:func:`split`)."""
    if step_on == "gpu" or not recs:
        return recs, []
    resident = [r for r in recs if r.key in hot]
    cold = [r for r in recs if r.key not in hot]
    if not cold:
        return resident, []
    if step_on == "cpu":
        return resident, cold
    weight_bytes = cold[0].params[0].element_size()
    gpu_idx, cpu_idx = split([r.numel for r in cold], rates, grad_bytes=weight_bytes, weight_bytes=weight_bytes)
    return resident + [cold[i] for i in gpu_idx], [cold[i] for i in cpu_idx]
