"""Probe (GPU machine): how fast can the expert store's host memory be page-locked, and what sets the rate?

Run r3 pinned the DeepSeek-MoE-16B recipe's 84 GiB store in 50 s (1.7 GiB/s) with ``RegisteredSlab`` (an anonymous
mmap per piece, MADV_DONTFORK, cudaHostRegister from 8 threads), as slow as cudaHostAlloc; run l3 had registered
malloc'd pages at 15 GiB/s. This pins ``--gib`` GiB in pieces of ``--piece-gib`` from 8 threads several ways and
prints GiB/s for each:

* ``mmap_register``: what the store did until run r4;
* ``mmap_touch_register``: the same, the pages first written by the thread (what the store does since r4);
* ``mmap_hugepage_register``: MADV_HUGEPAGE before registering (2 MiB pages where the kernel allows it);
* ``mmap_populate_register``: MAP_POPULATE (the kernel faults the mapping in at mmap);
* ``torch_empty_register``: torch.empty (malloc) then cudaHostRegister, as in run l3 (no MADV_DONTFORK);
* ``host_alloc``: torch.empty(pin_memory=True), cudaHostAlloc.

    python3 scripts/probe_pin_rate.py --gib 16
"""

from __future__ import annotations

import argparse
import json
import mmap
import time
from concurrent.futures import ThreadPoolExecutor

import torch

GiB = 2**30
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)


def _register(t: torch.Tensor) -> None:
    status = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0))
    if status != 0:
        raise RuntimeError(f"cudaHostRegister failed: {status}")


def piece(way: str, nbytes: int):
    """One pinned piece made ``way``; returns what keeps it alive."""
    if way == "host_alloc":
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    if way == "torch_empty_register":
        t = torch.empty(nbytes, dtype=torch.uint8)
        _register(t)
        return t
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (MAP_POPULATE if way == "mmap_populate_register" else 0)
    m = mmap.mmap(-1, nbytes, flags=flags)
    m.madvise(mmap.MADV_DONTFORK)
    if way == "mmap_hugepage_register":
        m.madvise(mmap.MADV_HUGEPAGE)
    t = torch.frombuffer(m, dtype=torch.uint8, count=nbytes)
    if way == "mmap_touch_register":
        t.view(torch.float32).zero_()
    _register(t)
    return (m, t)


def release(way: str, kept) -> None:
    if way == "host_alloc":
        return
    t = kept if way == "torch_empty_register" else kept[1]
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=16.0)
    ap.add_argument("--piece-gib", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=8)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("probe_pin_rate: needs CUDA")
    torch.cuda.init()
    n = max(1, round(args.gib / args.piece_gib))
    size = int(args.piece_gib * GiB)
    out = {"gib": n * size / GiB, "threads": args.threads}
    for way in ("mmap_register", "mmap_touch_register", "mmap_hugepage_register", "mmap_populate_register",
                "torch_empty_register", "host_alloc"):
        t0 = time.perf_counter()
        try:
            with ThreadPoolExecutor(args.threads) as pool:
                kept = list(pool.map(piece, [way] * n, [size] * n))
            seconds = time.perf_counter() - t0
            out[way] = round(n * size / GiB / seconds, 2)
            for k in kept:
                release(way, k)
            del kept
        except (RuntimeError, OSError, ValueError) as err:
            out[way] = f"error: {err}"
        print(f"{way}: {out[way]} GiB/s", flush=True)
    try:
        out["thp"] = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
    except OSError:
        pass
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
