"""Which rank holds which experts, which rank owns each expert's optimizer state, and the process groups.

Ranks are laid out ``rank = dp_index * ep + ep_index`` (``ep`` = ``parallel.expert_parallel``)::

    world 4, ep 2:   expert-parallel groups {0, 1} {2, 3}   (all-to-all of tokens inside each)
                     holder groups          {0, 2} {1, 3}   (ranks holding the same experts: their
                                                             gradients are reduced among them)

Each rank of an expert-parallel group holds the contiguous slice ``[ep_index * E/ep, (ep_index+1) * E/ep)``
of every MoE layer's E experts. Inside a holder group of h ranks, that slice is cut again into h
contiguous chunks: chunk i's optimizer state (master, exp_avg, exp_avg_sq) lives on the i-th holder only.
With ``ep = 1`` the holder group is the whole world and each rank owns about E / world experts per layer,
so the host memory of expert state per rank falls as 1 / world.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch.distributed as dist

from moetrain.config import ConfigError


def chunk_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of chunk ``index`` when ``n`` items are cut into ``parts`` contiguous, balanced chunks."""
    return index * n // parts, (index + 1) * n // parts


@dataclass
class ParallelLayout:
    """The placement of one rank.

    Attributes:
        rank, world: this process and the number of processes (``torch.distributed``'s).
        ep: expert-parallel size; ``num_experts``: routed experts per MoE layer (E).
        ep_group: ranks exchanging tokens with this one (None when ep == 1).
        holder_group: ranks holding the same experts as this one (None when alone).
        partition: expert optimizer state owned by one holder (True) or replicated on all holders.
    """

    rank: int
    world: int
    ep: int
    num_experts: int
    partition: bool = True
    ep_group: Any = None
    holder_group: Any = None
    holder_ranks: list[int] = field(default_factory=list)
    ep_ranks: list[int] = field(default_factory=list)

    @property
    def ep_index(self) -> int:
        return self.rank % self.ep

    @property
    def dp_index(self) -> int:
        return self.rank // self.ep

    @property
    def holders(self) -> int:
        """h: ranks holding each expert's compute weights (world / ep)."""
        return self.world // self.ep

    @property
    def local_experts(self) -> range:
        """Global ids of the experts whose compute weights this rank holds (every MoE layer alike)."""
        start, stop = chunk_bounds(self.num_experts, self.ep, self.ep_index)
        return range(start, stop)

    def owner_chunks(self) -> list[range]:
        """The local experts cut into one contiguous chunk per holder (holder i owns chunk i)."""
        local = self.local_experts
        return [range(local.start + a, local.start + b)
                for a, b in (chunk_bounds(len(local), self.holders, i) for i in range(self.holders))]

    @property
    def owned_experts(self) -> range:
        """Experts whose optimizer state this rank keeps (all local ones when the state is replicated)."""
        return self.owner_chunks()[self.dp_index] if self.partition else self.local_experts

    def owns(self, layer: int, expert: int) -> bool:
        """``ExpertStore``'s filter: the same experts in every MoE layer."""
        return expert in self.owned_experts

    def counts_norm(self, expert: int) -> bool:
        """Whether this rank adds ``expert``'s gradient to the global norm (exactly one rank per expert)."""
        return expert in self.owner_chunks()[self.dp_index]


def build_layout(num_experts: int, expert_parallel: int = 1, partition: bool = True) -> ParallelLayout:
    """The layout of this process; creates the process groups (every rank must call it, in the same order).

    Raises:
        ConfigError: ``expert_parallel`` does not divide the world size or the number of experts.
    """
    if not dist.is_initialized():
        raise ConfigError("moetrain.parallel needs torch.distributed to be initialised (launch with "
                          "trainer.devices > 1, torchrun or SLURM)")
    rank, world = dist.get_rank(), dist.get_world_size()
    ep = expert_parallel
    if world % ep:
        raise ConfigError(f"parallel.expert_parallel={ep} does not divide the {world} ranks; choose a divisor")
    if num_experts % ep:
        raise ConfigError(f"parallel.expert_parallel={ep} does not divide the {num_experts} routed experts per layer")
    layout = ParallelLayout(rank=rank, world=world, ep=ep, num_experts=num_experts, partition=partition)
    # new_group is collective over the world: every rank creates every group, in one order
    for dp_index in range(world // ep):
        ranks = [dp_index * ep + i for i in range(ep)]
        group = _new_group(ranks, world)
        if rank in ranks:
            layout.ep_group, layout.ep_ranks = group, ranks
    for ep_index in range(ep):
        ranks = [ep_index + ep * j for j in range(world // ep)]
        group = _new_group(ranks, world)
        if rank in ranks:
            layout.holder_group, layout.holder_ranks = group, ranks
    return layout


def _new_group(ranks: list[int], world: int) -> Optional[Any]:
    if len(ranks) == world:
        return dist.group.WORLD
    return dist.new_group(ranks)
