"""Swap files on disk: where they may go (:func:`preflight`), how they are made (preallocated and locked), and
how they go away however their process ends.

A swap file lives exactly as long as the process that made it, and can be as large as the experts'
whole optimizer state (57 GiB for DeepSeek-MoE-16B):

* ``SwapFile.close`` deletes it (the training module closes its optimizer when fit ends, the CLI on
  any error or Ctrl-C too);
* at interpreter exit (an exception, ``sys.exit``, Ctrl-C outside training) and on a SIGTERM that no
  one else handles, the files still open are deleted (:func:`remove_live_swap_files`);
* a process killed outright (SIGKILL, the OOM killer, a power cut) cannot clean up: its owner holds an
  exclusive ``flock`` on the file while it lives, which the kernel drops with the process, so the next
  start finds such files unlocked, reports them on stderr and deletes them (:func:`remove_stale_swap_files`).
"""

from __future__ import annotations

import atexit
import fcntl
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Optional

from moetrain.config import ConfigError

SWAP_NAME = re.compile(r"moetrain-experts-(?P<pid>\d+)-(?P<serial>\d+)\.swp")
"""Swap file names: the creating process's id and a per-process serial number."""
CREATION_WINDOW_S = 60.0
"""An unlocked swap file younger than this whose creator's pid is alive may be one being created (its
owner opens it, then locks it): it is left alone."""


class NvmeError(ConfigError):
    """The swap location cannot hold the plan; the message names the path and the numbers (a configuration
    error: the CLI reports it as one paragraph, exit status 2)."""



def preflight(path: str, needed_bytes: int) -> Path:
    """Check that ``path`` exists, is a writable folder and has ``needed_bytes`` free (after deleting the
    swap files that dead processes left there, see :func:`remove_stale_swap_files`).

    Raises:
        NvmeError: naming the path and what to do.
    """
    folder = Path(path)
    if not folder.exists():
        raise NvmeError(f"model.offload.nvme.path={path!r} does not exist: create the folder on a fast local disk "
                        "or point it at one")
    if not folder.is_dir():
        raise NvmeError(f"model.offload.nvme.path={path!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise NvmeError(f"model.offload.nvme.path={path!r} is not writable by this user: fix its permissions or "
                        "choose another folder")
    remove_stale_swap_files(folder)  # their space counts as free: they hold nothing anyone can use
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise NvmeError(f"model.offload.nvme.path={path!r} has {free / 2**30:.2f} GiB free but the offload plan needs "
                        f"{needed_bytes / 2**30:.2f} GiB of swap: free space there, choose a larger disk, or raise "
                        "model.offload.placement.cpu_budget_gb to keep more state in host memory")
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
                        "on that disk or point model.offload.nvme.path at a larger one") from None
    return file, fd


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


def add_live_swap_file(path: Path) -> None:
    """Count ``path`` among this process's swap files (deleted at exit and on SIGTERM until it is discarded)."""
    with _live_lock:
        _live.add(path)
    _clean_up_on_sigterm()


def discard_live_swap_file(path: Path) -> None:
    """``path`` was deleted by its owner: nothing left to clean up."""
    with _live_lock:
        _live.discard(path)


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
