"""Routed experts' weight gradients written straight into one stacked tensor per layer and matrix.

Each routed expert is its own ``Parameter`` (Hugging Face names, one offload-store record each). Left to autograd,
the grouped backward's three (E, ...) weight gradients would reach the model as 3 x E separate gradients: one
``AccumulateGrad`` node and one ``add_`` kernel each, every micro-batch (5 184 for DeepSeek-MoE-16B, most of a
micro-batch's host time at 2 048 tokens). Instead the grouped backward adds its results into three stacked tensors
whose slices ARE the trained experts' ``.grad``: three kernels a layer, whatever the number of experts.

The contract every reader of the gradients keeps: a trained expert's ``.grad`` is None or a view of its layer's
stack for that matrix. Setting a layer's gradients to None (``zero_grad``, or the engine after stepping the layer)
drops the views; once none is left the stack is freed, and the next backward starts a new one from its own result
(no copy). Values are those autograd's accumulation gives: the first micro-batch's gradient, then in-place adds in
the parameters' dtype.

Shapes: ``E`` experts of the layer, ``n`` of them trained, ``H`` hidden, ``I`` expert width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn as nn

_GROUPED_MM = getattr(torch, "_grouped_mm", None)  # bound once: the probe is not one of the model's GEMMs
_ZERO_FILL: dict[tuple[str, Optional[int]], bool] = {}  # per device: do empty groups of a grouped GEMM read as zero


def trained_experts(params: Sequence[nn.Parameter]) -> list[int]:
    """Indices of the experts (``params``: gate, up, down per expert, in expert order) whose weights train."""
    return [e for e in range(len(params) // 3) if any(p.requires_grad for p in params[3 * e:3 * e + 3])]


def grad_anchor(params: Sequence[nn.Parameter]) -> Optional[nn.Parameter]:
    """One trained expert parameter, passed to the grouped autograd functions so their output requires a gradient
    even when the rows do not (their gradients go into the stacks, not through autograd); None if none trains."""
    return next((p for p in params if p.requires_grad), None)


def empty_groups_read_zero(device: torch.device) -> bool:
    """Whether ``torch._grouped_mm``'s weight-gradient form (groups along the contraction) writes zeros for an empty
    group on ``device``. PyTorch's own tests check it for its CPU and Hopper kernels, but it is not documented and
    other kernels have left such groups as they found them; so it is probed once per device: the output block is
    first filled with NaN and handed back to the caching allocator, which returns it to the probe's output."""
    key = (device.type, device.index)
    if key not in _ZERO_FILL:
        hidden, width, rows = 64, 32, 32
        junk = torch.full((3, width, hidden), float("nan"), dtype=torch.bfloat16, device=device)
        del junk
        dy = torch.ones(rows, width, dtype=torch.bfloat16, device=device)
        x = torch.ones(rows, hidden, dtype=torch.bfloat16, device=device)
        offsets = torch.tensor([rows // 2, rows // 2, rows], dtype=torch.int32, device=device)  # group 1 is empty
        out = _GROUPED_MM(dy.t(), x, offs=offsets)  # (3, width, hidden)
        _ZERO_FILL[key] = bool((out[1] == 0).all())
    return _ZERO_FILL[key]


def _stack_of(params: Sequence[nn.Parameter], trained: list[int], matrix: int, n: int) -> Optional[torch.Tensor]:
    """The stack behind ``matrix``'s (0 gate, 1 up, 2 down) gradients if the first and last trained experts' grads
    are views of one tensor of ``n`` experts (how :func:`accumulate_expert_grads` leaves them), else None."""
    first, last = params[3 * trained[0] + matrix].grad, params[3 * trained[-1] + matrix].grad
    if first is None or last is None:
        return None
    base = first._base
    if base is None or last._base is not base or base.shape[0] != n:
        return None
    return base


def accumulate_expert_grads(params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor], *,
                            trained: list[int]) -> None:
    """Add one micro-batch's weight gradients of the trained experts to their ``.grad``.

    Args:
        params: gate, up and down weights of every expert of the layer, in expert order (3 E).
        grads: (d_gate (n, I, H), d_up (n, I, H), d_down (n, H, I)) of the trained experts ``trained`` (ascending
            expert indices, n of them), in the parameters' dtype. They are fresh tensors this call may keep: the
            first micro-batch's become the stacks.
        trained: the experts whose weights train; the others' ``.grad`` stays None.
    """
    if not trained:
        return
    n = len(trained)
    stacks = [_stack_of(params, trained, m, n) for m in range(3)]
    if all(s is not None for s in stacks):
        torch._foreach_add_(stacks, list(grads))  # the common case: three kernels
        return
    # A new step (no gradient yet), or gradients something else left: start stacks from this micro-batch's
    # result and fold in any gradient an expert already holds, so nothing accumulated is lost.
    for m, stack in enumerate(grads):
        for i, e in enumerate(trained):
            p = params[3 * e + m]
            if p.grad is not None:
                stack[i].add_(p.grad)
            p.grad = stack[i]
