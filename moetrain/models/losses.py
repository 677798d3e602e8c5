"""Auxiliary router losses. Each function takes one layer's routing and returns a scalar; nothing
is stored in module state, so every layer's loss travels with the autograd graph that made it.

Shapes: ``T`` tokens of the layer (batch * sequence flattened), ``E`` routed experts, ``k`` top-k.
``valid`` is an optional ``(T,)`` bool mask that excludes padding from every statistic.
"""

from __future__ import annotations

from typing import Optional

import torch


def _token_weights(valid: Optional[torch.Tensor], num_tokens: int, like: torch.Tensor) -> torch.Tensor:
    """(T,) float weights: 1 for real tokens, 0 for padding."""
    if valid is None:
        return torch.ones(num_tokens, dtype=like.dtype, device=like.device)
    return valid.reshape(-1).to(like.dtype)


def switch_load_balancing_loss(
    probs: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, *, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The Switch/Mixtral balance loss of one layer, equal to transformers' ``load_balancing_loss_func``.

    loss = E * sum_e f_e * P_e, where f_e is the fraction of (token, slot) assignments sent to expert e
    summed over the k slots (so sum_e f_e = k) and P_e the mean router probability of e, both over real
    tokens only. f carries no gradient (it comes from top-k); P carries it to the router.

    Args:
        probs: (T, E) softmax router probabilities in fp32.
        topk_idx: (T, k) chosen experts.
        num_experts: E.
        valid: (T,) bool, False at padding.
    """
    w = _token_weights(valid, probs.shape[0], probs)  # (T,)
    denom = w.sum().clamp_min(1.0)
    assign = torch.zeros_like(probs).scatter_add_(1, topk_idx, torch.ones_like(topk_idx, dtype=probs.dtype))
    f = (assign * w[:, None]).sum(0) / denom  # (E,)
    p = (probs * w[:, None]).sum(0) / denom  # (E,)
    return num_experts * (f.detach() * p).sum()


def deepseek_seq_balance_loss(
    probs: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, *, batch_size: int,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DeepSeek's sequence-level balance loss (``seq_aux=True``), padding excluded.

    For each sequence b: ce_{b,e} = (assignments to e in b) / (L_b * k / E), P_{b,e} = mean probability of
    e over b's tokens; loss = mean_b sum_e ce_{b,e} * P_{b,e}. With no padding this equals DeepSeek's code.

    Args:
        probs: (B*L, E) router probabilities.
        topk_idx: (B*L, k).
        batch_size: B.
    """
    k = topk_idx.shape[1]
    w = _token_weights(valid, probs.shape[0], probs).view(batch_size, -1)  # (B, L)
    probs_b = probs.view(batch_size, -1, num_experts)  # (B, L, E)
    idx_b = topk_idx.view(batch_size, -1, k)  # (B, L, k)
    lengths = w.sum(1).clamp_min(1.0)  # (B,)
    ce = torch.zeros(batch_size, num_experts, dtype=probs.dtype, device=probs.device)
    ce.scatter_add_(1, idx_b.reshape(batch_size, -1), w[:, :, None].expand(-1, -1, k).reshape(batch_size, -1))
    ce = ce / (lengths[:, None] * k / num_experts)  # (B, E)
    p = (probs_b * w[:, :, None]).sum(1) / lengths[:, None]  # (B, E)
    return (ce.detach() * p).sum(1).mean()


def deepseek_token_balance_loss(
    probs: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, *, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """DeepSeek's token-level balance loss (``seq_aux=False``): sum_e (E * ce_e) * P_e with
    ce_e = assignments to e / (T * k), padding excluded."""
    k = topk_idx.shape[1]
    w = _token_weights(valid, probs.shape[0], probs)
    denom = w.sum().clamp_min(1.0)
    assign = torch.zeros_like(probs).scatter_add_(1, topk_idx, w[:, None].expand(-1, k).contiguous())
    ce = assign.sum(0) / (denom * k)  # (E,)
    p = (probs * w[:, None]).sum(0) / denom
    return (p * ce.detach() * num_experts).sum()


def router_z_loss(logits: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)^2. logits: (T, E)."""
    z = torch.logsumexp(logits.float(), dim=-1) ** 2  # (T,)
    w = _token_weights(valid, logits.shape[0], z)
    return (z * w).sum() / w.sum().clamp_min(1.0)
