"""NVMe swap files: DeepSpeed's async I/O op as the backend, a threaded pread/pwrite fallback, and
pre-flight checks that fail before training starts.

A swap file is preallocated to its full size (``os.posix_fallocate``), so a full disk is found at
start-up, never mid-run. Every record starts at a multiple of :data:`ALIGN` bytes and its length is
rounded up to it, so the aio backend can use O_DIRECT reads/writes straight into pinned buffers.

A swap file lives exactly as long as the process that made it, and can be as large as the experts'
whole optimizer state (57 GiB for DeepSeek-MoE-16B):

* ``SwapFile.close`` deletes it (the training module closes its optimizer when fit ends, the CLI on
  any error or Ctrl-C too);
* at interpreter exit (an exception, ``sys.exit``, Ctrl-C outside training) and on a SIGTERM that no
  one else handles, the files still open are deleted (:func:`remove_live_swap_files`);
* a process killed outright (SIGKILL, the OOM killer, a power cut) cannot clean up: its owner holds an
  exclusive ``flock`` on the file while it lives, which the kernel drops with the process, so the next
  start finds such files unlocked, reports them on stderr and deletes them (:func:`remove_stale_swap_files`).

Both backends expose the same two-phase interface: ``submit_read/submit_write`` return at once
(the transfer runs in the background: libaio's queue or a thread pool) and ``wait_reads/wait_writes``
block until every submitted request of that kind is done. Reads and writes use separate handles so
a page-in never waits behind a page-out.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Optional

import torch

from moetrain.config import ConfigError

log = logging.getLogger(__name__)

ALIGN = 4096
"""O_DIRECT alignment of offsets, lengths and buffer addresses (a page; covers 512-byte sectors)."""


SWAP_NAME = re.compile(r"moetrain-experts-(?P<pid>\d+)-(?P<serial>\d+)\.swp")
"""Swap file names: the creating process's id and a per-process serial number."""
CREATION_WINDOW_S = 60.0
"""An unlocked swap file younger than this whose creator's pid is alive may be one being created (its
owner opens it, then locks it): it is left alone."""


class NvmeError(ConfigError):
    """The swap location cannot hold the plan; the message names the path and the numbers (a configuration
    error: the CLI reports it as one paragraph, exit status 2)."""


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def preflight(path: str, needed_bytes: int) -> Path:
    """Check that ``path`` exists, is a writable folder and has ``needed_bytes`` free (after deleting the
    swap files that dead processes left there, see :func:`remove_stale_swap_files`).

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
    remove_stale_swap_files(folder)  # their space counts as free: they hold nothing anyone can use
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise NvmeError(f"model.offload.nvme_path={path!r} has {free / 2**30:.2f} GiB free but the offload plan needs "
                        f"{needed_bytes / 2**30:.2f} GiB of swap: free space there, choose a larger disk, or raise "
                        "model.offload.cpu_budget_gb to keep more state in host memory")
    return folder


def create_swap_file(folder: Path, name: str, size: int) -> tuple[Path, int]:
    """Create ``folder/name`` (it must not exist), lock it and preallocate ``size`` bytes (blocks reserved now,
    so a full disk fails here).

    Returns:
        (the file, an open descriptor holding an exclusive ``flock`` on it). Keep the descriptor open while
        the file is in use: the lock is how another process tells a live swap file from a dead one's, and the
        kernel drops it when this process ends, however it ends.
    """
    file = folder / name
    fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a file only just created: no one else can hold it
    try:
        os.posix_fallocate(fd, 0, max(size, 1))
    except OSError as err:
        file.unlink(missing_ok=True)
        os.close(fd)
        raise NvmeError(f"cannot preallocate {size / 2**30:.2f} GiB for swap file {str(file)!r}: {err}; free space "
                        "on that disk or point model.offload.nvme_path at a larger one") from None
    return file, fd


# ---------------------------------------------------------------------------------------------- cleanup
_live: set[Path] = set()
"""Swap files this process created and has not deleted yet (deleted at exit and on SIGTERM)."""
_live_lock = threading.Lock()


def remove_live_swap_files() -> None:
    """Delete every swap file this process still has (at interpreter exit and on SIGTERM). Unlinking is enough:
    I/O still in flight completes on the open descriptors and the space is freed when they close."""
    with _live_lock:
        files = list(_live)
        _live.clear()
    for file in files:
        try:
            file.unlink(missing_ok=True)
        except OSError:  # the folder went away or turned read-only: nothing more to do on the way out
            pass


atexit.register(remove_live_swap_files)


def _on_sigterm(signum: int, frame: Optional[FrameType]) -> None:
    # the default action would end the process without atexit: delete the swap files, then die by the signal as
    # before (the exit status still says SIGTERM)
    remove_live_swap_files()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _clean_up_on_sigterm() -> None:
    """Delete swap files on a SIGTERM that would otherwise end the process at once (where SIGTERM has its default
    action). Training replaces the handler with its own graceful stop (moetrain.training.signals), which falls back
    to this one on a second SIGTERM."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


@dataclass(frozen=True)
class StaleSwapFile:
    """A swap file whose process ended without deleting it."""

    path: Path
    pid: int
    nbytes: int


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _is_stale(file: Path, pid: int) -> bool:
    """No process holds the file's lock, and it is not one being created right now."""
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError:  # gone already, or not ours to read
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its owner is alive
        young = time.time() - os.fstat(fd).st_mtime < CREATION_WINDOW_S
        return not (young and _pid_alive(pid))
    finally:
        os.close(fd)  # releases the lock taken here


def find_stale_swap_files(folder: str | Path) -> list[StaleSwapFile]:
    """Swap files in ``folder`` left by processes that ended without deleting them (killed with SIGKILL, by the OOM
    killer, or the machine went down). A file whose owner lives is never listed: its owner holds its lock."""
    stale = []
    for file in sorted(Path(folder).glob("moetrain-experts-*.swp")):
        match = SWAP_NAME.fullmatch(file.name)
        if match is None or not _is_stale(file, int(match["pid"])):
            continue
        try:
            nbytes = file.stat().st_blocks * 512  # allocated bytes: what deleting it gives back
        except FileNotFoundError:
            continue
        stale.append(StaleSwapFile(file, int(match["pid"]), nbytes))
    return stale


def remove_stale_swap_files(folder: str | Path) -> list[StaleSwapFile]:
    """Delete the swap files of dead processes in ``folder`` (:func:`find_stale_swap_files`) and say so on stderr.

    Their contents are of no use to anyone: a swap file holds the live optimizer state of one process, and a run
    resumes from its checkpoints, never from a swap file. Returns what was deleted.
    """
    removed = []
    for stale in find_stale_swap_files(folder):
        try:
            stale.path.unlink()
        except FileNotFoundError:  # another process cleaned up first
            continue
        except OSError as err:
            _report(f"cannot delete stale swap file {stale.path} ({stale.nbytes / 2**30:.2f} GiB, left by process "
                    f"{stale.pid}): {err.strerror or err}; delete it by hand")
            continue
        removed.append(stale)
    if removed:
        total = sum(s.nbytes for s in removed) / 2**30
        names = ", ".join(f"{s.path.name} (process {s.pid}, {s.nbytes / 2**30:.2f} GiB)" for s in removed)
        _report(f"deleted {len(removed)} stale swap file(s) in {folder}, {total:.2f} GiB in all, left by processes "
                f"that ended without cleaning up (killed, out of memory, or the machine went down): {names}")
    return removed


def _report(message: str) -> None:
    # stderr, not the logging tree: a start-up report must not depend on how a host program configured logging
    print(f"moetrain: {message}", file=sys.stderr, flush=True)


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

    _serial = 0

    def __init__(self, folder: str, size: int, backend: str = "auto", block_size: int = 1 << 20,
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
        with _live_lock:
            _live.add(self.path)
        _clean_up_on_sigterm()
        self.size = size
        self._open = lambda: open_backend(self.path, backend, block_size, queue_depth, threads)
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
            with _live_lock:
                _live.discard(self.path)
        if self._lock_fd is not None:  # after the unlink: no one may see the file unlocked while it exists
            os.close(self._lock_fd)
            self._lock_fd = None


def open_swap(folder: Optional[str], size: int, **kw) -> Optional[SwapFile]:
    """A swap file of ``size`` bytes in ``folder``, or None when nothing overflows to NVMe."""
    if size <= 0:
        return None
    if not folder:
        raise NvmeError(f"{size / 2**30:.2f} GiB of expert state exceed model.offload.cpu_budget_gb and must go to "
                        "NVMe: set model.offload.nvme_path=DIR")
    return SwapFile(folder, size, **kw)
