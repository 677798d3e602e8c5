"""Progress bars: optimizer steps during training, and long loops (saves, loads, imports) elsewhere.

Both are quiet unless stderr is a terminal, so logs and CI output stay clean; ``progress.enabled``
forces the training bar on or off, and :func:`forced` (which the training bar applies for its run)
does the same for the bars of long loops: checkpoint saves and loads, Hugging Face imports, exports.

The training bar (:class:`~moetrain.training.progress.StepProgress`) lives in the training layer because it
needs Lightning; this module does not, so that ``moetrain export`` and ``from_pretrained`` show their bars
without importing Lightning, and the model loaders below the training layer can use them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, TypeVar

T = TypeVar("T")


_forced: Optional[bool] = None  # set by forced(): overrides the terminal check of long-loop bars


def stderr_is_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def shown(enabled: Optional[bool] = None) -> bool:
    """Whether a long-loop bar is drawn: ``enabled`` if given, else :func:`forced`'s setting, else a terminal."""
    if enabled is not None:
        return enabled
    return stderr_is_terminal() if _forced is None else _forced


def set_forced(enabled: Optional[bool]) -> Optional[bool]:
    """Long-loop bars follow ``enabled`` from now on (None: the terminal decides); returns the previous setting."""
    global _forced
    before, _forced = _forced, enabled
    return before


@contextmanager
def forced(enabled: Optional[bool]) -> Iterator[None]:
    """Within the block, long-loop bars follow ``enabled`` (None: the terminal decides)."""
    before = set_forced(enabled)
    try:
        yield
    finally:
        set_forced(before)


def progress_iter(iterable: Iterable[T], total: Optional[int] = None, desc: str = "", *, unit: str = "it",
                  enabled: Optional[bool] = None) -> Iterator[T]:
    """``iterable`` with a tqdm bar on stderr when it is a terminal (``enabled`` None), else unchanged.

    For long loops outside training: writing checkpoint shards, loading them, importing a Hugging Face model.
    """
    if not shown(enabled):
        yield from iterable
        return
    from tqdm.auto import tqdm

    with tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        yield from bar


def shard_progress(stream: Iterable[tuple[Path, str, Any]], total: Optional[int], desc: str,
                   *, enabled: Optional[bool] = None) -> Iterator[tuple[Path, str, Any]]:
    """``(shard path, name, tensor)`` items passed through, with a bar that counts shards as the path changes.

    ``total``: the number of shard files (None: unknown). Used by every streaming checkpoint read.
    """
    if not shown(enabled):
        yield from stream
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="shard", file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        current = None
        for item in stream:
            if item[0] != current:
                if current is not None:
                    bar.update(1)
                current = item[0]
                bar.set_postfix_str(Path(current).name, refresh=False)
            yield item
        if current is not None:
            bar.update(1)


def tensor_progress(stream: Iterable[tuple[str, Any]], desc: str, total_bytes: Optional[int] = None,
                    *, enabled: Optional[bool] = None) -> Iterator[tuple[str, Any]]:
    """``(name, tensor)`` items passed through, with a bar in bytes (for writes, whose shards are cut as the
    bytes arrive, so bytes are what is known ahead)."""
    if not shown(enabled):
        yield from stream
        return
    from tqdm.auto import tqdm

    with tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              dynamic_ncols=True, leave=False) as bar:
        for name, tensor in stream:
            yield name, tensor
            bar.update(tensor.numel() * tensor.element_size())

