"""The expert store's pinned host memory: fresh anonymous pages, kept out of forked children, page-locked by
cudaHostRegister.

Page-locking (pinning) lets the copy engines move expert state between host and GPU asynchronously at link
speed. Two ways were measured on an H200 host (benchmarks/README.md, runs l0, l3 and q1):

* cudaHostAlloc (PyTorch's ``pin_memory=True``): 1.6-1.9 GiB/s, 35-39 s for the 56 GiB store of the
  DeepSeek-MoE-16B recipe; a fork copies none of it (the driver's mappings are not inherited).
* cudaHostRegister of ordinary pages, several pieces at once: 6-11 GiB/s. But the kernel copies DMA-pinned
  anonymous pages into a forked child at fork time: the recipe's first DataLoader worker copied the 84 GiB store
  and the run was killed for memory (run l3); a 16 GiB probe copied 17.7 GiB (run q1).

Marking the pages ``MADV_DONTFORK`` before registering them keeps them out of every child (the probe's fork then
copied 0.06 GiB, and copies to the GPU from them still work). Writing the pages before registering them makes
pinning 5x faster (``scripts/probe_pin_rate.py``, run r4: 2.4 GiB/s for untouched pages, 12.5 GiB/s touched, both
from 8 threads; cudaHostAlloc 2.3 GiB/s): the kernel's page faults are cheaper from an ordinary write than from
inside the registration. The children (data loader workers) never read the
store. So each piece is its own anonymous mapping (``mmap``: page-aligned, as madvise needs), marked, then
registered. Where any part is unavailable (no CUDA, no ``MADV_DONTFORK``, a registration error) the caller falls
back to cudaHostAlloc.
"""

from __future__ import annotations

import mmap
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

PIN_THREADS = 8
"""Threads that allocate the pinned slab pieces."""


class RegisteredSlab:
    """One page-aligned anonymous mapping of ``nbytes``, marked ``MADV_DONTFORK`` and (``register``) page-locked.

    ``tensor`` is a (nbytes // 4,) float32 view of it; the mapping lives as long as this object or the tensor.
    """

    def __init__(self, nbytes: int, *, register: bool = True) -> None:
        self.nbytes = nbytes
        self.map = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.map.madvise(mmap.MADV_DONTFORK)
        self.tensor = torch.frombuffer(self.map, dtype=torch.float32, count=nbytes // 4)
        self.registered = False
        if register:
            # fault the pages in first: registering untouched pages ran at 2.4 GiB/s, touched ones at 12.5 GiB/s
            # (8 pieces at once, run r4); the fill overwrites every byte afterwards anyway
            self.tensor.zero_()
            status = int(torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0))
            if status != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.2f} GiB failed with cudaError {status}")
            self.registered = True

    def unregister(self) -> None:
        """Unlock the pages (idempotent); the memory stays readable (copies from it are then synchronous)."""
        if self.registered:
            self.registered = False
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())


def register_supported() -> bool:
    """Whether :class:`RegisteredSlab` can pin here: a CUDA device and Linux's ``MADV_DONTFORK``."""
    return torch.cuda.is_available() and hasattr(mmap, "MADV_DONTFORK")


def pin_pieces(piece_bytes: list[int], *, pin: bool) -> tuple[list[torch.Tensor], list[RegisteredSlab]]:
    """(float32 tensors of ``piece_bytes`` each, the :class:`RegisteredSlab` behind them): with ``pin``, registered
    pieces from a thread pool where :func:`register_supported`, else (or when a registration fails) cudaHostAlloc'd
    ones, also from the pool; plain host memory without ``pin``. Unregister the slabs when done with them."""
    if not pin or not piece_bytes:
        return [torch.empty(n // 4, dtype=torch.float32) for n in piece_bytes], []
    threads = min(max(1, min(PIN_THREADS, os.cpu_count() or 1)), len(piece_bytes))
    if register_supported():
        with ThreadPoolExecutor(threads) as pool:
            futures = [pool.submit(RegisteredSlab, n) for n in piece_bytes]
        pieces, errors = [], []
        for future in futures:
            try:
                pieces.append(future.result())
            except (RuntimeError, OSError, ValueError) as err:
                errors.append(err)
        if not errors:
            return [piece.tensor for piece in pieces], pieces
        print(f"expert store: cudaHostRegister failed ({errors[0]}); pinning by cudaHostAlloc instead",
              file=sys.stderr, flush=True)
        for piece in pieces:
            piece.unregister()
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda n: torch.empty(n // 4, dtype=torch.float32, pin_memory=True), piece_bytes)), []


def dontfork_flag(ptr: int) -> Optional[bool]:
    """Whether the mapping holding address ``ptr`` is marked not to be copied into a forked child (``dc`` in its
    ``VmFlags`` in /proc/self/smaps); None where that file does not exist or no mapping holds ``ptr``."""
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and ":" not in head:
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo <= ptr < hi
                elif inside and line.startswith("VmFlags:"):
                    return "dc" in line.split()[1:]
    except OSError:
        return None
    return None
