"""Rank r of ``world`` trains on rows r, r + world, r + 2 world, ... of the data module's own row order.

The global batch of a step is then exactly the rows a one-process run with a ``world`` times larger
micro-batch takes, in the same order. A resume continues where the saved run stopped at any world size:
checkpoints written by several ranks record the global micro-batch (rows summed over ranks, see
:func:`~moetrain.parallel.checkpoint.save_checkpoint_distributed`), so the position they give is in rows
of the shared order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import Sampler


class RankShardSampler(Sampler[int]):
    """Deals the rows of ``inner`` (a :class:`~moetrain.training.sampler.ResumableSampler` or any sized
    sampler) out to ``world`` ranks; every rank gets ``len(inner) // world`` rows an epoch (the tail that
    does not divide is dropped, so that every rank runs the same number of steps)."""

    def __init__(self, inner: Sampler[int], rank: int, world: int) -> None:
        self.inner, self.rank, self.world = inner, rank, world

    def __len__(self) -> int:
        return len(self.inner) // self.world  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def resume_at(self, epoch: int, rows_consumed: int) -> None:
        """``rows_consumed``: rows of the shared order that all ranks together had trained on in ``epoch``."""
        self.inner.resume_at(epoch, rows_consumed)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[int]:
        rows = list(self.inner)
        usable = len(rows) - len(rows) % self.world
        return iter(rows[self.rank:usable:self.world])

    def __getattr__(self, name: str) -> Any:
        # ``seed``, ``shuffle``, ``num_rows`` ... of the wrapped sampler
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
