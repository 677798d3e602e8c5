"""A row sampler whose order depends only on (seed, epoch), and that can resume in the middle of an epoch.

Lightning calls ``set_epoch`` before every epoch. A resumed run calls :meth:`ResumableSampler.resume_at`
with the epoch and the number of rows the saved run had consumed in it; the next iteration over that
epoch then starts at that row of the same permutation, so the resumed run sees exactly the rows that
the uninterrupted run would have seen. Later epochs are whole again.

The sampler does not count consumed rows itself: a DataLoader with workers reads ahead, so only the
training loop knows which rows were trained on (see :mod:`moetrain.training.trainer_state`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """A permutation of ``num_rows`` rows per epoch, seeded by ``seed`` and the epoch (not the global RNG).

    Args:
        num_rows: rows in the dataset.
        seed: data order seed.
        shuffle: False keeps the file order in every epoch.
    """

    def __init__(self, num_rows: int, seed: int, shuffle: bool = True) -> None:
        self.num_rows = num_rows
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._resume: Optional[tuple[int, int]] = None  # (epoch, rows already consumed in it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, rows_consumed: int) -> None:
        """Skip the first ``rows_consumed`` rows of ``epoch``'s permutation, once, when that epoch is next iterated."""
        if not 0 <= rows_consumed <= self.num_rows:
            raise ValueError(f"cannot resume at row {rows_consumed} of an epoch of {self.num_rows} rows; the "
                             "checkpoint was written with other data (data.path, data.seq_len)")
        self._resume = (epoch, rows_consumed)

    def __len__(self) -> int:
        # the full epoch even while resuming: Lightning reads the length once, before the first epoch
        return self.num_rows

    def order(self, epoch: int) -> list[int]:
        """The row order of ``epoch``."""
        if not self.shuffle:
            return list(range(self.num_rows))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_rows, generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:
        rows = self.order(self.epoch)
        if self._resume is not None and self._resume[0] == self.epoch:
            rows = rows[self._resume[1]:]
            self._resume = None
        return iter(rows)
