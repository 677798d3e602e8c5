"""Expert parallelism: each rank of a group of G holds E/G of a layer's experts; tokens travel to them.

One MoE layer's routed experts on rank r (``T`` local tokens, ``k`` slots, ``N = T * k``, ``E_loc = E/G``)::

    dispatch        rows sorted by global expert id                      (N, H) on this rank
    counts a2a      (E,) -> (G, E_loc): rows each source sends to my experts      fixed shape
    rows a2a        blocks for rank 0, 1, ... -> blocks from rank 0, 1, ...       (R, H)
    regroup         (source, expert) order -> (expert, source) order     permutation, (R, H)
    compute         this rank's E_loc experts (grouped GEMM or loop)     (R, H)
    inverse regroup, rows a2a back (splits swapped)                      (N, H)
    combine         * routing weight, index_add into (T, H)

The router, attention and shared experts stay replicated (data parallel); only the routed experts are
split. Parameter names are unchanged (``...mlp.experts.{e}.gate_proj.weight`` with the global ``e``):
the other ranks' experts are :class:`AbsentExpert` placeholders without parameters, so a checkpoint
written by several ranks is read back by name at any expert-parallel size.

The host reads the split sizes once per layer and direction (``all_to_all_single`` takes them as lists):
a device sync per MoE layer on the GPU, the known price of variable-size all-to-all.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from moetrain.models.experts import RoutedExperts, combine, dispatch, run_grouped, sort_rows
from moetrain.models.router import Routing
from moetrain.parallel.all_to_all import all_to_all, exchange_counts


class AbsentExpert(nn.Module):
    """Stands at the index of an expert that another rank of the expert-parallel group holds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this expert lives on another rank of the expert-parallel group")


class ExpertParallelExperts(RoutedExperts):
    """:class:`RoutedExperts` holding the experts ``local`` (a contiguous range of global ids) of one layer.

    Args:
        experts: the layer's full :class:`RoutedExperts` (its local experts' modules are kept, not copied).
        local: global ids held here; ``group``: the expert-parallel process group (G ranks, rank g holds
            ``[g * E/G, (g+1) * E/G)``).
    """

    def __init__(self, experts: RoutedExperts, local: range, group: Any) -> None:
        nn.ModuleList.__init__(self, [experts[e] if e in local else AbsentExpert()
                                      for e in range(experts.num_experts)])
        self.num_experts = experts.num_experts
        self.hidden_size = experts.hidden_size
        self.intermediate_size = experts.intermediate_size
        self.impl = experts.impl
        self.local = local
        self.group = group

    def local_modules(self) -> list[nn.Module]:
        return [self[e] for e in self.local]

    def packed_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(E_loc, I, H), (E_loc, I, H), (E_loc, H, I) packed weights of the local experts (see the base class)."""
        view = RoutedExperts.__new__(RoutedExperts)
        nn.ModuleList.__init__(view, self.local_modules())
        return RoutedExperts.packed_weights(view)

    def forward(self, x: torch.Tensor, routing: Routing, *, recomputing: bool = False) -> torch.Tensor:
        """x: (T, H) local tokens; returns (T, H), the routed experts' combined output for them."""
        d = dispatch(routing)
        x_sorted = sort_rows(x, d)  # (N, H), sorted by global expert
        if torch.is_autocast_enabled(x.device.type):
            x_sorted = x_sorted.to(torch.get_autocast_dtype(x.device.type))
        size = len(self.local)
        received = exchange_counts(routing.counts, self.group)  # (G, E_loc)
        send_splits = routing.counts.view(-1, size).sum(1).tolist()  # rows to each rank
        recv_splits = received.sum(1).tolist()  # rows from each rank
        x_recv = all_to_all(x_sorted, recv_splits, send_splits, group=self.group)  # (R, H) in (source, expert) order
        local_counts = received.sum(0)  # (E_loc,)
        expert_of_row = torch.repeat_interleave(
            torch.arange(size, device=x.device).repeat(received.shape[0]), received.reshape(-1))  # (R,)
        order = torch.argsort(expert_of_row, stable=True)  # (expert, source) order
        y_local = self._compute_local(x_recv[order], local_counts)  # (R, H)
        y_recv = torch.empty_like(y_local).index_copy(0, order, y_local)  # back to (source, expert) order
        y = all_to_all(y_recv, send_splits, recv_splits, group=self.group)  # (N, H), sorted like x_sorted
        return combine(y, d, x.dtype)

    def _compute_local(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows: (R, H) sorted by local expert, ``counts`` (E_loc,) -> (R, H).

        With no rows the output is still a function of ``rows`` (an empty product), so the backward
        all-to-all runs on this rank like on the others.
        """
        sizes = counts.tolist()
        if sum(sizes) == 0:
            return rows * 0
        if self.use_grouped(rows):
            params = [p for e in self.local_modules() for p in (e.gate_proj.weight, e.up_proj.weight,
                                                                e.down_proj.weight)]
            offsets = torch.cumsum(counts, 0).to(torch.int32)
            return run_grouped(rows, counts, offsets, packed=self.packed_weights(), params=params)
        pieces, start = [], 0
        for expert, n in zip(self.local_modules(), sizes, strict=True):
            if n:
                pieces.append(expert(rows[start:start + n]))
            start += n
        return torch.cat(pieces, 0)


def apply_expert_parallel(model: nn.Module, local: range, group: Any) -> None:
    """Replace every MoE block's routed experts by this rank's share (the others' modules are dropped)."""
    for block in model.moe_blocks():
        block.experts = ExpertParallelExperts(block.experts, local, group)
