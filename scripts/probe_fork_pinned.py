"""Probe (GPU machine): does forking a process copy its pinned host memory?

The DeepSeek-MoE-16B recipe was killed for memory as its first DataLoader worker forked while the expert
store's 84 GiB were pinned by cudaHostRegister of malloc'd pages (benchmarks/README.md, run l3). This pins
16 GiB by cudaHostAlloc, then by cudaHostRegister, then marks the registered pages MADV_DONTFORK, forks a
sleeping child each time and prints how much MemAvailable fell while the child lived (a copy: about 16 GiB),
and that a copy from the registered memory to the GPU still works after madvise. Not yet run.

    python3 scripts/probe_fork_pinned.py
"""

from __future__ import annotations

import ctypes
import json
import os
import time

import torch

GiB = 2**30
PINNED_BYTES = 16 * GiB
MADV_DONTFORK = 10


def available() -> int:
    """MemAvailable of /proc/meminfo, bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def fork_cost() -> float:
    """GiB that MemAvailable fell while a forked child of this process lived."""
    before = available()
    pid = os.fork()
    if pid == 0:
        time.sleep(4)
        os._exit(0)
    time.sleep(2)
    during = available()
    os.waitpid(pid, 0)
    return round((before - during) / GiB, 2)


def dont_fork(t: torch.Tensor) -> int:
    """madvise(MADV_DONTFORK) over the whole pages of ``t``; returns madvise's status."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    start = (t.data_ptr() + page - 1) // page * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTFORK)


def main() -> None:
    out: dict[str, object] = {}
    pinned = torch.ones(PINNED_BYTES // 4, dtype=torch.float32, pin_memory=True)
    out["cudaHostAlloc_fork_gib"] = fork_cost()
    del pinned
    torch._C._host_emptyCache()
    torch.cuda.memory._set_allocator_settings("pinned_use_cuda_host_register:True,pinned_num_register_threads:8")
    registered = torch.ones(PINNED_BYTES // 4, dtype=torch.float32, pin_memory=True)
    out["cudaHostRegister_fork_gib"] = fork_cost()
    out["madvise_status"] = dont_fork(registered)
    out["cudaHostRegister_dontfork_fork_gib"] = fork_cost()
    device = torch.empty(1 << 20, device="cuda")
    device.copy_(registered[: 1 << 20], non_blocking=True)
    torch.cuda.synchronize()
    out["copy_after_madvise_ok"] = bool(device.eq(1).all())
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
