"""The top-k router: scores tokens, picks experts, and returns the layer's auxiliary loss.

Routing for a layer is produced here and only here; :class:`Routing` is what the expert compute
and the offload engine consume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from moetrain.config import ModelConfig
from moetrain.models import losses


@dataclass
class Routing:
    """One layer's routing decision for ``T`` tokens.

    Attributes:
        topk_idx: (T, k) int64 expert ids.
        topk_weight: (T, k) combine weights, in the router's compute dtype (fp32).
        counts: (E,) int64 tokens per expert, on the device (no host sync to produce it).
        logits: (T, E) raw router logits (fp32).
        aux_loss: scalar, this layer's auxiliary loss already scaled by its coefficient.
    """

    topk_idx: torch.Tensor
    topk_weight: torch.Tensor
    counts: torch.Tensor
    logits: torch.Tensor
    aux_loss: torch.Tensor


class TopKRouter(nn.Module):
    """Softmax top-k router with optional renormalisation and the family's balance loss.

    The linear layer is named ``weight`` of shape (E, H) like Hugging Face's ``gate``.
    """

    def __init__(self, config: ModelConfig, aux_scale: float = 1.0) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.aux_kind = config.aux_loss
        # aux_scale spreads a per-model coefficient over layers (see MoETransformer).
        self.aux_coef = config.aux_loss_coef * aux_scale
        self.z_coef = config.router_z_loss_coef * aux_scale
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, batch_size: int, valid: Optional[torch.Tensor] = None) -> Routing:
        """Route ``x`` of shape (T, H) where T = batch_size * seq_len; ``valid`` (T,) marks real tokens."""
        logits = nn.functional.linear(x.float(), self.weight.float())  # (T, E) in fp32 for a stable softmax
        probs = logits.softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(probs, self.top_k, dim=-1)  # (T, k)
        if self.norm_topk_prob and self.top_k > 1:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weight = topk_weight * self.scaling
        # scatter_add_ instead of bincount: bincount on CUDA syncs the host to size its output.
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, topk_idx.reshape(-1), torch.ones_like(topk_idx.reshape(-1)))
        aux = logits.new_zeros(())
        if self.aux_coef > 0:
            if self.aux_kind == "switch":
                aux = aux + self.aux_coef * losses.switch_load_balancing_loss(probs, topk_idx, self.num_experts, valid)
            elif self.aux_kind == "seq":
                aux = aux + self.aux_coef * losses.deepseek_seq_balance_loss(
                    probs, topk_idx, self.num_experts, batch_size, valid)
            elif self.aux_kind == "token":
                aux = aux + self.aux_coef * losses.deepseek_token_balance_loss(probs, topk_idx, self.num_experts, valid)
        if self.z_coef > 0:
            aux = aux + self.z_coef * losses.router_z_loss(logits, valid)
        return Routing(topk_idx=topk_idx, topk_weight=topk_weight, counts=counts, logits=logits, aux_loss=aux)
