"""The MoE block: router, routed experts, and the family's shared expert(s)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from moetrain.config import DEEPSEEK_FAMILIES, ModelConfig
from moetrain.models.experts import RoutedExperts, SwiGLU
from moetrain.models.router import Routing, TopKRouter
from moetrain.models.seam import RoutingSink


class MoEBlock(nn.Module):
    """Routes each token to k of E experts and adds the shared expert(s).

    * deepseek_moe, deepseek_v2, deepseek_v3: ``shared_experts`` is one SwiGLU of width
      moe_intermediate_size * n_shared.
    * qwen2_moe: ``shared_expert`` scaled by sigmoid(``shared_expert_gate``(x)).

    ``sink``, when attached (:meth:`~moetrain.models.decoder.MoEForCausalLM.attach_offload`), is told every
    routing decision of this layer (evaluation forwards too; not the re-run in backward) before the experts
    run, so that an offload engine can page the experts' state in.
    """

    def __init__(self, config: ModelConfig, layer_idx: int, aux_scale: float = 1.0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = TopKRouter(config, aux_scale=aux_scale)
        self.experts = RoutedExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size,
                                     layer_idx=layer_idx)
        self.shared_experts: Optional[nn.Module] = None
        self.shared_expert: Optional[nn.Module] = None
        self.shared_expert_gate: Optional[nn.Linear] = None
        if config.family in DEEPSEEK_FAMILIES and config.num_shared_experts > 0:
            self.shared_experts = SwiGLU(config.hidden_size, config.shared_width)
        elif config.shared_expert_intermediate_size > 0:
            self.shared_expert = SwiGLU(config.hidden_size, config.shared_expert_intermediate_size)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.sink: Optional[RoutingSink] = None

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None, *,
                recomputing: bool = False) -> tuple[torch.Tensor, Routing]:
        """x: (B, L, H); valid: (B, L) bool or None; ``recomputing``: this forward is activation checkpointing's
        re-run in backward (its routing was reported by the first pass). Returns ((B, L, H), routing)."""
        b, seq, h = x.shape
        flat = x.reshape(b * seq, h)  # (T, H)
        routing = self.gate(flat, batch_size=b, valid=None if valid is None else valid.reshape(-1))
        if self.sink is not None and not recomputing:
            self.sink.routed(self.layer_idx, routing, flat)
        out = self.experts(flat, routing, recomputing=recomputing)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        return out.reshape(b, seq, h), routing
