"""The ``parallel:`` section of a recipe: how the ranks of a multi-process run share the model."""

from __future__ import annotations

from dataclasses import dataclass

from moetrain.config import ConfigError


@dataclass
class ParallelConfig:
    """Every field is a recipe key under ``parallel:``; the number of ranks is ``trainer.devices * trainer.num_nodes``.

    With one rank nothing changes. With several, dense parameters are replicated and their gradients
    summed, and each routed expert's optimizer state lives on one rank only (see :mod:`moetrain.parallel`).
    """

    expert_parallel: int = 1
    """Ranks that split each MoE layer's routed experts between them (tokens travel by all-to-all). 1: every
    rank holds every expert's compute weights (data parallel, expert optimizer state still partitioned).
    Must divide the number of ranks and the number of routed experts."""
    partition_expert_state: bool = True
    """Each expert's master weights and Adam moments on one rank of those holding its compute weights
    (gradients reduced to it, new weights broadcast from it). False replicates the state on every such rank.
    ``model.offload.placement.tier: none`` always replicates (its reference AdamW steps every parameter it holds)."""

    def __post_init__(self) -> None:
        if self.expert_parallel < 1:
            raise ConfigError(f"parallel.expert_parallel={self.expert_parallel}: must be >= 1")
