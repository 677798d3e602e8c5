"""SIGTERM and Ctrl-C (SIGINT) during training: finish the optimizer step, save a checkpoint, exit.

A signal only sets a flag; the checkpoint callback sees it at the next optimizer-step boundary (at most
``accumulate_grad_batches`` micro-batches later), saves, and stops the trainer. Stopping inside a step
would leave gradients half accumulated and expert state half paged, which no checkpoint could express.
A second signal of the same kind gives up waiting: SIGINT raises ``KeyboardInterrupt`` at once, SIGTERM
falls back to the handler that was there before (Lightning's, or the default: terminate).

``moetrain fit`` then exits with status 128 + the signal number (143 for SIGTERM, 130 for Ctrl-C), as a
shell reports a process ended by that signal, so a job scheduler can tell an interrupted run from a
finished one; ``checkpoints/last`` names the checkpoint to resume from.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Optional

HANDLED = (signal.SIGTERM, signal.SIGINT)

_received: Optional[int] = None
_previous: dict[int, Any] = {}


def _handler(signum: int, frame: Optional[FrameType]) -> None:
    global _received
    if _received == signum:  # asked twice: stop waiting for the step boundary
        previous = _previous.get(signum, signal.SIG_DFL)
        uninstall()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        return
    _received = signum


def install() -> None:
    """Catch SIGTERM and SIGINT until :func:`uninstall` (only from the main thread; elsewhere a no-op)."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        return
    _received = None
    for signum in HANDLED:
        if signum not in _previous:
            _previous[signum] = signal.getsignal(signum)
        signal.signal(signum, _handler)


def uninstall() -> None:
    """Put back the handlers found by :func:`install` (the flag stays readable)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, previous in list(_previous.items()):
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        del _previous[signum]


def requested() -> Optional[int]:
    """The signal number received since :func:`install`, or None."""
    return _received


def exit_status() -> int:
    """0, or 128 + the signal that stopped training."""
    return 0 if _received is None else 128 + int(_received)


def clear() -> None:
    global _received
    _received = None
