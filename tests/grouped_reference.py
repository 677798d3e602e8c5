"""The routed experts' output computed straight from three stacked leaf weights with ``torch._grouped_mm`` and
``index_add_``, so autograd's own backward of those ops is the reference for the stacked expert gradients
(``tests/models/test_expert_grads.py``, ``tests/gpu/test_expert_grads_cuda.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_reference(x: torch.Tensor, routing, stacks: list[torch.Tensor]) -> torch.Tensor:
    """(T, H): each token's sum over its k experts of weight * SwiGLU, from ``x`` (T, H) and ``stacks`` (gate
    (E, I, H), up (E, I, H), down (E, H, I)) in ``x``'s dtype."""
    k = routing.topk_idx.shape[1]
    order = torch.argsort(routing.topk_idx.reshape(-1), stable=True)
    rows = x[order // k]
    offs = torch.cumsum(routing.counts, 0).to(torch.int32)
    g = torch._grouped_mm(rows, stacks[0].transpose(1, 2), offs=offs)
    u = torch._grouped_mm(rows, stacks[1].transpose(1, 2), offs=offs)
    y = torch._grouped_mm(F.silu(g) * u, stacks[2].transpose(1, 2), offs=offs)
    y = y * routing.topk_weight.reshape(-1)[order][:, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, order // k, y)
