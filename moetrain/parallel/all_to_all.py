"""All-to-all of token rows between the ranks of an expert-parallel group, differentiable.

The row counts differ per rank and per step, but the sequence of collectives never does: every rank
first exchanges its (E,) per-expert counts (a fixed-shape all-to-all), then exchanges rows with split
sizes both sides agree on (zero rows is a valid split). A rank whose experts got no tokens, or that
routed no token to another rank, still calls both, in forward and in backward, so no rank waits forever.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def exchange_counts(counts: torch.Tensor, group: Any) -> torch.Tensor:
    """(E,) rows this rank sends to each expert -> (G, E/G) rows each source rank sends to this rank's experts.

    ``counts`` is split evenly: the slice ``[g * E/G, (g+1) * E/G)`` goes to rank g of ``group``.
    """
    size = dist.get_world_size(group)
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received.view(size, -1)


class AllToAll(torch.autograd.Function):
    """forward(x (N, H), out_splits, in_splits, group) -> (sum(out_splits), H); backward sends the
    gradient rows back along the same routes (splits swapped)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        grad_x = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_x, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_x, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], *, group: Any) -> torch.Tensor:
    """Send ``x``'s rows in blocks of ``in_splits`` to the group's ranks; receive blocks of ``out_splits``."""
    return AllToAll.apply(x, out_splits, in_splits, group)
