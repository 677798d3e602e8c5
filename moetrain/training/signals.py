"""SIGTERM and Ctrl-C (SIGINT) during training: finish the optimizer step, save a checkpoint, exit.

A signal only sets a flag; the checkpoint callback sees it at the next optimizer-step boundary (at most
``accumulate_grad_batches`` micro-batches later), saves, and stops the trainer. Stopping inside a step
would leave gradients half accumulated and expert state half paged, which no checkpoint could express.
A second signal of the same kind gives up waiting: SIGINT raises ``KeyboardInterrupt`` at once, SIGTERM
falls back to the handler that was there before (Lightning's, or the default: terminate).

``moetrain fit`` then exits with status 128 + the signal number (143 for SIGTERM, 130 for Ctrl-C), as a
shell reports a process ended by that signal, so a job scheduler can tell an interrupted run from a
finished one; ``checkpoints/last`` names the checkpoint to resume from. It says so on stderr
(:func:`stop_message`): the signal, the step, the checkpoint saved and the command that resumes.

With several ranks, every rank must stop at the same step (the save is a collective): the checkpoint
callback asks all ranks at each step boundary whether any received a signal.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
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
    """Forget a received signal (a new run in the same process starts unsignalled)."""
    global _received
    _received = None


def describe(signum: int) -> str:
    """``Ctrl-C (SIGINT)`` or ``SIGTERM``: how the user knows the signal."""
    name = signal.Signals(signum).name
    return f"Ctrl-C ({name})" if signum == signal.SIGINT else name


def stop_message(signum: int, step: int, *, saved: Optional[Path], resume: str) -> str:
    """What a run stopped by ``signum`` after optimizer step ``step`` tells the user: the checkpoint ``saved``
    (None: none this run) and the command ``resume`` that continues it."""
    if saved is not None:
        return (f"moetrain: {describe(signum)} received: stopped after optimizer step {step} and saved checkpoint "
                f"{saved} (checkpoints/last names it).\nResume with:\n  {resume}")
    if step == 0:
        return (f"moetrain: {describe(signum)} received before the first optimizer step ended: stopped, nothing "
                "saved. Start the run again with the same command.")
    return (f"moetrain: {describe(signum)} received: stopped after optimizer step {step} without saving "
            "(checkpoint.save_on_signal is false); checkpoints/last names the newest checkpoint, if any.\n"
            f"Resume with:\n  {resume}")


def forced_stop_message(signum: int, newest: Optional[Path], command: str) -> str:
    """What a run stopped by a second signal (not waiting for the step to end, so nothing saved) tells the user:
    the newest complete checkpoint ``newest`` and ``command``, which resumes from it (or, None: starts again)."""
    said = f"moetrain: {describe(signum)} received twice: stopped at once, without saving the step under way"
    if newest is None:
        return f"{said}; the run has no checkpoint.\nStart it again with:\n  {command}"
    return f"{said}; the newest checkpoint is {newest}.\nResume from it with:\n  {command}"
