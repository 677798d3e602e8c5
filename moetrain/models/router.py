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
    """Top-k router with the family's scoring, expert selection and balance loss.

    The linear layer is named ``weight`` of shape (E, H) like Hugging Face's ``gate``.

    * scoring: ``softmax`` over experts, or ``sigmoid`` per expert (DeepSeek-V3);
    * selection (``topk_method``): ``greedy``; ``group_limited_greedy`` (DeepSeek-V2): the experts are split
      into ``n_group`` groups, each token keeps the ``topk_group`` groups whose best expert scores highest and
      picks its top-k inside them; ``noaux_tc`` (DeepSeek-V3): like group-limited, but on the scores plus
      ``e_score_correction_bias`` and with groups ranked by the sum of their two best experts. The bias only
      chooses experts; the combine weights are the unbiased scores.
    * weights: optionally renormalised over the top-k, then times ``routed_scaling_factor``.

    ``e_score_correction_bias`` (E,) exists for ``noaux_tc`` only. It is a persistent buffer (checkpointed under
    the Hugging Face name ``...mlp.gate.e_score_correction_bias``), gets no gradient, is moved between steps by
    :mod:`moetrain.models.balance`, and stays fp32 when the model is cast (as transformers keeps it).
    """

    def __init__(self, config: ModelConfig, aux_scale: float = 1.0) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.aux_kind = config.aux_loss
        self.scoring_func = config.scoring_func
        self.topk_method = config.topk_method
        self.n_group, self.topk_group = config.n_group, config.topk_group
        # aux_scale spreads a per-model coefficient over layers (see MoETransformer).
        self.aux_coef = config.aux_loss_coef * aux_scale
        self.z_coef = config.router_z_loss_coef * aux_scale
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        self.e_score_correction_bias: Optional[torch.Tensor]
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse: bool = True):
        """Keep ``e_score_correction_bias`` fp32 through ``.to(dtype)`` / ``.half()`` / ``to_empty``: a bf16 bias
        would round the small per-step updates away."""
        bias = self._buffers.get("e_score_correction_bias")
        super()._apply(fn, recurse)
        moved = self._buffers.get("e_score_correction_bias")
        if bias is not None and moved is not None and moved.dtype != torch.float32:
            if bias.is_meta or moved.is_meta:  # nothing to preserve; keep the dtype only
                fresh = torch.empty(moved.shape, dtype=torch.float32, device=moved.device)
            else:
                fresh = bias.to(device=moved.device, dtype=torch.float32)
            self._buffers["e_score_correction_bias"] = fresh
        return self

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """(T, G) group scores -> (T, E) bool mask of the experts inside each token's topk_group best groups."""
        group_idx = torch.topk(group_scores, self.topk_group, dim=-1, sorted=False)[1]  # (T, topk_group)
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)  # (T, G)
        per_group = self.num_experts // self.n_group
        return group_mask[:, :, None].expand(-1, -1, per_group).reshape(-1, self.num_experts).bool()

    def select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, E) scores -> top-k (weights, expert ids), each (T, k), before renormalisation and scaling."""
        if self.topk_method == "greedy":
            return torch.topk(scores, self.top_k, dim=-1)
        t = scores.shape[0]
        if self.topk_method == "group_limited_greedy":
            group_scores = scores.view(t, self.n_group, -1).max(dim=-1).values  # (T, G)
            masked = scores.masked_fill(~self._group_mask(group_scores), 0.0)  # scores are > 0: 0 never wins
            return torch.topk(masked, self.top_k, dim=-1, sorted=False)
        choice = scores + self.e_score_correction_bias  # (T, E), used for choosing only
        group_scores = choice.view(t, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)  # (T, G)
        choice = choice.masked_fill(~self._group_mask(group_scores), float("-inf"))
        topk_idx = torch.topk(choice, self.top_k, dim=-1, sorted=False)[1]
        return scores.gather(1, topk_idx), topk_idx

    def forward(self, x: torch.Tensor, batch_size: int, valid: Optional[torch.Tensor] = None) -> Routing:
        """Route ``x`` of shape (T, H) where T = batch_size * seq_len; ``valid`` (T,) marks real tokens."""
        logits = nn.functional.linear(x.float(), self.weight.float())  # (T, E) in fp32 for a stable softmax
        if self.scoring_func == "softmax":
            probs = logits.softmax(dim=-1)
            topk_weight, topk_idx = self.select(probs)  # (T, k)
        else:
            scores = logits.sigmoid()  # (T, E) independent affinities
            topk_weight, topk_idx = self.select(scores)
            # the balance losses take a distribution per token: DeepSeek-V3 normalises the affinities
            probs = scores / scores.sum(dim=-1, keepdim=True)
        # DeepSeek-V3 (transformers) renormalises even for k = 1; the softmax families only for k > 1.
        if self.norm_topk_prob and (self.top_k > 1 or self.scoring_func == "sigmoid"):
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weight = topk_weight * self.scaling
        # scatter_add_ instead of bincount: bincount on CUDA syncs the host to size its output.
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, topk_idx.reshape(-1), torch.ones_like(topk_idx.reshape(-1)))
        aux = logits.new_zeros(())
        if self.aux_coef > 0:
            if self.aux_kind == "switch":
                aux = aux + self.aux_coef * losses.switch_load_balancing_loss(probs, topk_idx, self.num_experts,
                                                                              valid=valid)
            elif self.aux_kind == "seq":
                aux = aux + self.aux_coef * losses.deepseek_seq_balance_loss(
                    probs, topk_idx, self.num_experts, batch_size=batch_size, valid=valid)
            elif self.aux_kind == "token":
                aux = aux + self.aux_coef * losses.deepseek_token_balance_loss(probs, topk_idx, self.num_experts,
                                                                               valid=valid)
        if self.z_coef > 0:
            aux = aux + self.z_coef * losses.router_z_loss(logits, valid)
        return Routing(topk_idx=topk_idx, topk_weight=topk_weight, counts=counts, logits=logits, aux_loss=aux)
