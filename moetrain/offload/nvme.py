"""NVMe swap files: :class:`SwapFile`, the file the expert store pages state to, over DeepSpeed's async I/O op
or a threaded pread/pwrite fallback (:mod:`moetrain.offload.swap_io`), with pre-flight checks that fail before
training starts and clean-up however the process ends (:mod:`moetrain.offload.swap_files`).

A swap file is preallocated to its full size (``os.posix_fallocate``), so a full disk is found at
start-up, never mid-run. Every record starts at a multiple of :data:`ALIGN` bytes and its length is
rounded up to it, so the aio backend can use O_DIRECT reads/writes straight into pinned buffers.

Deleting a swap file however its process ends, and finding those a killed process left behind, is
:mod:`moetrain.offload.swap_files`; the backends' two-phase interface (submit now, wait later) is
:mod:`moetrain.offload.swap_io`.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from moetrain.offload.swap_files import (
    CREATION_WINDOW_S,
    SWAP_NAME,
    NvmeError,
    StaleSwapFile,
    add_live_swap_file,
    create_swap_file,
    discard_live_swap_file,
    find_stale_swap_files,
    preflight,
    remove_live_swap_files,
    remove_stale_swap_files,
)
from moetrain.offload.swap_io import AioBackend, ThreadBackend, aio_available, open_backend

__all__ = ["ALIGN", "CREATION_WINDOW_S", "SWAP_NAME", "AioBackend", "NvmeError", "StaleSwapFile", "SwapFile",
           "ThreadBackend", "aio_available", "align_up", "aligned_empty", "create_swap_file", "find_stale_swap_files",
           "open_backend", "open_swap", "preflight", "remove_live_swap_files", "remove_stale_swap_files"]

ALIGN = 4096
"""O_DIRECT alignment of offsets, lengths and buffer addresses (a page; covers 512-byte sectors)."""


def align_up(n: int, a: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``a``."""
    return (n + a - 1) // a * a


def aligned_empty(numel: int, pin: bool) -> torch.Tensor:
    """A (numel,) fp32 host tensor whose data starts on an :data:`ALIGN` boundary (O_DIRECT needs it)."""
    pad = ALIGN // 4
    raw = torch.empty(numel + pad, dtype=torch.float32, pin_memory=pin)
    shift = (-raw.data_ptr() % ALIGN) // 4
    return raw[shift:shift + numel]


class SwapFile:
    """One preallocated swap file with aligned slots addressed by byte offset.

    Its default I/O channel serves the swapper; :meth:`channel` opens another one on the same file
    (its own aio handles or thread pool) for a second user in another thread, such as the CPU step path.
    """

    _serial = 0

    def __init__(self, folder: str, size: int, *, backend: str = "auto", block_size: int = 1 << 20,
                 queue_depth: int = 8, threads: int = 4, name: Optional[str] = None) -> None:
        base = preflight(folder, size)
        self._lock_fd: Optional[int] = None
        while True:  # one file per store: two runs (or two stores) may share a folder
            if name is None:
                SwapFile._serial += 1
            try:
                self.path, self._lock_fd = create_swap_file(
                    base, name or f"moetrain-experts-{os.getpid()}-{SwapFile._serial}.swp", size)
                break
            except FileExistsError:
                if name is not None:
                    raise NvmeError(f"swap file {str(base / name)!r} exists already: another process uses it, or "
                                    "delete it") from None
        add_live_swap_file(self.path)
        self.size = size
        self._open = lambda: open_backend(self.path, backend, block_size=block_size, queue_depth=queue_depth,
                                          threads=threads)
        try:
            self.io = self._open()
        except BaseException:
            self._release(remove=True)
            raise
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
        other._lock_fd = None  # the file's owner holds the lock
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
        """Finish pending I/O and close every channel; ``remove``: delete the file (the owner's default; a channel
        is closed with ``remove=False``). The file is deleted even when the I/O fails."""
        try:
            for ch in self.channels:
                ch.close(remove=False)
            self.wait_reads()
            self.wait_writes()
            if isinstance(self.io, ThreadBackend):
                self.io.close()
        finally:
            self._release(remove)

    def _release(self, remove: bool) -> None:
        if remove:
            self.path.unlink(missing_ok=True)
            discard_live_swap_file(self.path)
        if self._lock_fd is not None:  # after the unlink: no one may see the file unlocked while it exists
            os.close(self._lock_fd)
            self._lock_fd = None


def open_swap(folder: Optional[str], size: int, **kw) -> Optional[SwapFile]:
    """A swap file of ``size`` bytes in ``folder``, or None when nothing overflows to NVMe."""
    if size <= 0:
        return None
    if not folder:
        raise NvmeError(f"{size / 2**30:.2f} GiB of expert state exceed model.offload.placement.cpu_budget_gb and "
                        "must go to NVMe: set model.offload.nvme.path=DIR")
    return SwapFile(folder, size, **kw)
