"""NVMe swap files: DeepSpeed's async I/O op as the backend, a threaded pread/pwrite fallback, and
pre-flight checks that fail before training starts.

A swap file is preallocated to its full size (``os.posix_fallocate``), so a full disk is found at
start-up, never mid-run. Every record starts at a multiple of :data:`ALIGN` bytes and its length is
rounded up to it, so the aio backend can use O_DIRECT reads/writes straight into pinned buffers.

Both backends expose the same two-phase interface: ``submit_read/submit_write`` return at once
(the transfer runs in the background: libaio's queue or a thread pool) and ``wait_reads/wait_writes``
block until every submitted request of that kind is done. Reads and writes use separate handles so
a page-in never waits behind a page-out.
"""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

ALIGN = 4096
"""O_DIRECT alignment of offsets, lengths and buffer addresses (a page; covers 512-byte sectors)."""


class NvmeError(RuntimeError):
    """The swap location cannot hold the plan; the message names the path and the numbers."""


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def preflight(path: str, needed_bytes: int) -> Path:
    """Check that ``path`` exists, is a writable folder and has ``needed_bytes`` free.

    Raises:
        NvmeError: naming the path and what to do.
    """
    folder = Path(path)
    if not folder.exists():
        raise NvmeError(f"model.offload.nvme_path={path!r} does not exist: create the folder on a fast local disk "
                        "or point nvme_path at one")
    if not folder.is_dir():
        raise NvmeError(f"model.offload.nvme_path={path!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise NvmeError(f"model.offload.nvme_path={path!r} is not writable by this user: fix its permissions or "
                        "choose another folder")
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise NvmeError(f"model.offload.nvme_path={path!r} has {free / 2**30:.2f} GiB free but the offload plan needs "
                        f"{needed_bytes / 2**30:.2f} GiB of swap: free space there, choose a larger disk, or raise "
                        "model.offload.cpu_budget_gb to keep more state in host memory")
    return folder


def create_swap_file(folder: Path, name: str, size: int) -> Path:
    """Preallocate ``folder/name`` to ``size`` bytes (blocks reserved now, so a full disk fails here)."""
    file = folder / name
    fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, max(size, 1))
    except OSError as err:
        os.close(fd)
        file.unlink(missing_ok=True)
        raise NvmeError(f"cannot preallocate {size / 2**30:.2f} GiB for swap file {str(file)!r}: {err}") from err
    os.close(fd)
    return file


def aligned_empty(numel: int, pin: bool) -> torch.Tensor:
    """A (numel,) fp32 host tensor whose data starts on an :data:`ALIGN` boundary (O_DIRECT needs it)."""
    pad = ALIGN // 4
    raw = torch.empty(numel + pad, dtype=torch.float32, pin_memory=pin)
    shift = (-raw.data_ptr() % ALIGN) // 4
    return raw[shift:shift + numel]


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


def open_backend(file: Path, backend: str, block_size: int, queue_depth: int,
                 threads: int) -> AioBackend | ThreadBackend:
    """The I/O backend for ``file``: ``aio`` where libaio exists (``auto``), else the thread fallback."""
    if backend == "threads":
        return ThreadBackend(file, threads)
    if aio_available():
        return AioBackend(file, block_size, queue_depth)
    if backend == "aio":
        raise NvmeError("model.offload.nvme_backend=aio but DeepSpeed's async I/O op cannot be built here: install "
                        "libaio (apt-get install libaio-dev) or set nvme_backend=auto")
    log.warning("libaio is missing: the NVMe tier uses threaded pread/pwrite, which is slower than DeepSpeed's async "
                "I/O; install libaio-dev for the fast path")
    return ThreadBackend(file, threads)


class SwapFile:
    """One preallocated swap file with aligned slots addressed by byte offset.

    Its default I/O channel serves the swapper; :meth:`channel` opens another one on the same file
    (its own aio handles or thread pool) for a second user in another thread, such as the CPU step path.
    """

    _instances = 0

    def __init__(self, folder: str, size: int, backend: str = "auto", block_size: int = 1 << 20,
                 queue_depth: int = 8, threads: int = 4, name: Optional[str] = None) -> None:
        if name is None:  # one file per store: two runs (or two stores) may share a folder
            SwapFile._instances += 1
            name = f"moetrain-experts-{os.getpid()}-{SwapFile._instances}.swp"
        base = preflight(folder, size)
        self.path = create_swap_file(base, name, size)
        self.size = size
        self._open = lambda: open_backend(self.path, backend, block_size, queue_depth, threads)
        self.io = self._open()
        self.channels: list[SwapFile] = []
        self.bytes_read = 0
        self.bytes_written = 0

    @property
    def backend(self) -> str:
        return self.io.name

    def channel(self) -> SwapFile:
        """Another I/O channel on this file, counting its bytes into this file's counters."""
        other = object.__new__(SwapFile)
        other.path, other.size, other._open, other.channels = self.path, self.size, self._open, []
        other.io = self._open()
        other.bytes_read = other.bytes_written = 0
        other._parent = self
        self.channels.append(other)
        return other

    def _count(self, read: int, written: int) -> None:
        target = getattr(self, "_parent", self)
        target.bytes_read += read
        target.bytes_written += written

    def submit_read(self, buf: torch.Tensor, offset: int) -> None:
        """Start reading ``buf.nbytes`` bytes at ``offset`` into ``buf`` (aligned, contiguous)."""
        assert offset % ALIGN == 0 and buf.nbytes % ALIGN == 0, "swap I/O must be aligned"
        self.io.submit_read(buf, offset)
        self._count(buf.nbytes, 0)

    def submit_write(self, buf: torch.Tensor, offset: int) -> None:
        assert offset % ALIGN == 0 and buf.nbytes % ALIGN == 0, "swap I/O must be aligned"
        self.io.submit_write(buf, offset)
        self._count(0, buf.nbytes)

    def wait_reads(self) -> None:
        self.io.wait_reads()

    def wait_writes(self) -> None:
        self.io.wait_writes()

    def close(self, remove: bool = True) -> None:
        for ch in self.channels:
            ch.close(remove=False)
        self.wait_reads()
        self.wait_writes()
        if isinstance(self.io, ThreadBackend):
            self.io.close()
        if remove:
            self.path.unlink(missing_ok=True)


def open_swap(folder: Optional[str], size: int, **kw) -> Optional[SwapFile]:
    """A swap file of ``size`` bytes in ``folder``, or None when nothing overflows to NVMe."""
    if size <= 0:
        return None
    if not folder:
        raise NvmeError(f"{size / 2**30:.2f} GiB of expert state exceed model.offload.cpu_budget_gb and must go to "
                        "NVMe: set model.offload.nvme_path=DIR")
    return SwapFile(folder, size, **kw)
