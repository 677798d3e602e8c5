"""What a user watches while the expert store fills: records and GiB done, GiB/s and the time left, on stderr.

Filling the store of a full-size model (pinning tens of GiB of host memory, encoding every expert's master weights
and zero moments, or streaming them from ``init_from``) takes seconds to minutes before the first step. On a
terminal a bar in bytes shows it (tqdm: GiB, GiB/s, ETA, and the records as its postfix); elsewhere (a log file,
CI) a line says what starts, another follows every ``every_s`` seconds, and a last line always says what it took::

    expert store: filling 1728 records, 56.24 GiB (pinned host memory)
    expert store: 412/1728 records, 13.41/56.24 GiB, 9.87 GiB/s, ETA 4 s
    filled expert store: 1728 records, 56.24 GiB in 5.8 s (pinning 3.1 s)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, Optional

from moetrain.progress import shown

GiB = 2**30


class FillProgress:
    """Progress of filling ``records`` expert records (``nbytes`` bytes of state).

    Args:
        records / nbytes: the totals.
        what: the first line's text after ``expert store:`` (e.g. ``filling 1728 records, 56.24 GiB``).
        bar: draw a tqdm bar (None: on a terminal, or as :func:`moetrain.progress.forced` says); otherwise lines.
        every_s: seconds between two lines (no bar).
        clock: the time source (tests pass their own).
    """

    def __init__(self, records: int, nbytes: int, what: str, *, bar: Optional[bool] = None, every_s: float = 10.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.total_records, self.total_bytes = records, nbytes
        self.records = self.nbytes = 0
        self.every_s, self.clock = every_s, clock
        self.start = self.last_line = clock()
        self.extra = ""  # appended to the last line (e.g. the pinning time)
        self.bar: Any = None
        if shown(bar):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=nbytes, desc="expert store", unit="B", unit_scale=True, unit_divisor=1024,
                            file=sys.stderr, dynamic_ncols=True, leave=False)
        else:
            self._print(f"expert store: {what}")

    @staticmethod
    def _print(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def update(self, records: int, nbytes: int) -> None:
        """``records`` more records (``nbytes`` bytes) are filled."""
        self.records += records
        self.nbytes += nbytes
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.records}/{self.total_records} records", refresh=False)
            self.bar.update(nbytes)
            return
        now = self.clock()
        if now - self.last_line >= self.every_s and self.records < self.total_records:
            self.last_line = now
            self._print(self.line(now))

    def line(self, now: float) -> str:
        """``expert store: 412/1728 records, 13.41/56.24 GiB, 9.87 GiB/s, ETA 4 s``."""
        elapsed = max(now - self.start, 1e-9)
        rate = self.nbytes / elapsed
        eta = f"ETA {(self.total_bytes - self.nbytes) / rate:.0f} s" if rate > 0 else "ETA unknown"
        return (f"expert store: {self.records}/{self.total_records} records, {self.nbytes / GiB:.2f}/"
                f"{self.total_bytes / GiB:.2f} GiB, {rate / GiB:.2f} GiB/s, {eta}")

    def close(self, complete: bool = True) -> None:
        """Remove the bar; ``complete``: print the last line (a fill that failed prints none)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if complete:
            self._print(f"filled expert store: {self.records} records, {self.nbytes / GiB:.2f} GiB in "
                        f"{self.clock() - self.start:.1f} s{self.extra}")
