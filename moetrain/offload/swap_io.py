"""The two I/O backends of a swap file: DeepSpeed's async I/O op (O_DIRECT, libaio's queue) and a threaded
pread/pwrite fallback.

Both expose the same two-phase interface: ``submit_read/submit_write`` return at once (the transfer runs in the
background: libaio's queue or a thread pool) and ``wait_reads/wait_writes`` block until every submitted request of
that kind is done. Reads and writes use separate handles so a page-in never waits behind a page-out.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from moetrain.offload.swap_files import NvmeError

log = logging.getLogger("moetrain.offload.nvme")  # the NVMe tier's one logger, which users and tests filter on


def aio_available() -> bool:
    """Whether DeepSpeed's async I/O op can be built here (libaio present)."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
        return bool(AsyncIOBuilder().is_compatible(verbose=False))
    except Exception:  # deepspeed missing or broken: the fallback serves
        return False


class AioBackend:
    """DeepSpeed ``aio_handle``: O_DIRECT, ``block_size`` requests, ``queue_depth`` in flight."""

    name = "aio"

    def __init__(self, file: Path, block_size: int, queue_depth: int) -> None:
        from moetrain.offload.ops import load_async_io
        op = load_async_io()
        self.file = str(file)
        self.reader = op.aio_handle(block_size, queue_depth, False, True, 1)
        self.writer = op.aio_handle(block_size, queue_depth, False, True, 1)
        self.pending_reads = 0
        self.pending_writes = 0

    def submit_read(self, buf: torch.Tensor, offset: int) -> None:
        self.reader.pread(buf, self.file, False, True, offset)
        self.pending_reads += 1

    def submit_write(self, buf: torch.Tensor, offset: int) -> None:
        self.writer.pwrite(buf, self.file, False, True, offset)
        self.pending_writes += 1

    def wait_reads(self) -> None:
        if self.pending_reads:
            self.reader.wait()
            self.pending_reads = 0

    def wait_writes(self) -> None:
        if self.pending_writes:
            self.writer.wait()
            self.pending_writes = 0


class ThreadBackend:
    """``os.pread``/``os.pwrite`` on a thread pool (used only when libaio is missing)."""

    name = "threads"

    def __init__(self, file: Path, threads: int) -> None:
        self.fd = os.open(file, os.O_RDWR)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moetrain-nvme")
        self.reads: list[Future] = []
        self.writes: list[Future] = []

    def _read(self, buf: torch.Tensor, offset: int) -> None:
        view = memoryview(buf.numpy()).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"short read at offset {offset + done}")
            done += n

    def _write(self, buf: torch.Tensor, offset: int) -> None:
        view = memoryview(buf.numpy()).cast("B")
        done = 0
        while done < len(view):
            done += os.pwritev(self.fd, [view[done:]], offset + done)

    def submit_read(self, buf: torch.Tensor, offset: int) -> None:
        self.reads.append(self.pool.submit(self._read, buf, offset))

    def submit_write(self, buf: torch.Tensor, offset: int) -> None:
        self.writes.append(self.pool.submit(self._write, buf, offset))

    def wait_reads(self) -> None:
        for f in self.reads:
            f.result()
        self.reads.clear()

    def wait_writes(self) -> None:
        for f in self.writes:
            f.result()
        self.writes.clear()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        os.close(self.fd)


def open_backend(file: Path, backend: str, *, block_size: int, queue_depth: int,
                 threads: int) -> AioBackend | ThreadBackend:
    """The I/O backend for ``file``: ``aio`` where libaio exists (``auto``), else the thread fallback."""
    if backend == "threads":
        return ThreadBackend(file, threads)
    if aio_available():
        return AioBackend(file, block_size, queue_depth)
    if backend == "aio":
        raise NvmeError("model.offload.nvme.backend=aio but DeepSpeed's async I/O op cannot be built here: install "
                        "libaio (apt-get install libaio-dev) or set nvme.backend=auto")
    log.warning("libaio is missing: the NVMe tier uses threaded pread/pwrite, which is slower than DeepSpeed's async "
                "I/O; install libaio-dev for the fast path")
    return ThreadBackend(file, threads)
