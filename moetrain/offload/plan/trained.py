"""What trains, as the planner counts it: the parameters of each dense ``model.train`` group, and the groups a
recipe freezes (:mod:`moetrain.models.train_selection` decides the same for a built model).

A frozen dense parameter keeps its fp32 weight on the GPU and is still computed with, but has no gradient and no
AdamW moments (4 B/param instead of 16), no moments in a checkpoint, and no weight-gradient GEMM in backward.
"""

from __future__ import annotations

from typing import Any

from moetrain.config import ModelConfig
from moetrain.models.train_selection import GROUPS

DENSE_GROUPS: tuple[str, ...] = tuple(g for g in GROUPS if g != "routed_experts")
"""The ``model.train`` groups of the dense part (everything but the routed experts)."""


def dense_group_params(config: ModelConfig) -> dict[str, int]:
    """Parameters of each dense ``model.train`` group of ``config``, from the config's arithmetic (as
    ``ModelConfig.param_counts``, whose ``dense`` they sum to; attention is the rest, so that every attention
    variant's projections and norms count there). With tied embeddings the one matrix is ``embeddings``'
    (``lm_head`` 0): the two groups must be frozen together."""
    h, n_layers = config.hidden_size, config.num_hidden_layers
    n_moe = len(config.moe_layers)
    shared = 3 * h * config.shared_width + (h if config.shared_expert_gate else 0)
    groups = {
        "embeddings": config.vocab_size * h,
        "lm_head": 0 if config.tie_word_embeddings else config.vocab_size * h,
        "norms": h + n_layers * 2 * h,  # the final norm and two per layer
        "routers": n_moe * h * config.num_experts,
        "shared_experts": n_moe * shared,
        "dense_mlp": (n_layers - n_moe) * 3 * h * config.intermediate_size,
    }
    groups["attention"] = config.param_counts()["dense"] - sum(groups.values())
    return {g: groups[g] for g in DENSE_GROUPS}


def frozen_dense_groups(train: Any) -> tuple[str, ...]:
    """The dense groups a recipe's ``model.train`` freezes, in :data:`DENSE_GROUPS` order: ``all`` or None
    freezes none; a mapping (or a :class:`~moetrain.models.train_selection.TrainSelection`) freezes each group
    set false. Read without checking the rest (a selection file need not exist yet to plan)."""
    if train is None or isinstance(train, str):
        return ()
    value = train.get if isinstance(train, dict) else (lambda g, default: getattr(train, g, default))
    return tuple(g for g in DENSE_GROUPS if value(g, True) is False)
