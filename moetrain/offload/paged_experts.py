"""The routed experts' compute with paged weights (``resident_weights: no``): autograd functions that fetch the
weights from an :class:`~moetrain.offload.weight_pager.ExpertWeightPager` for the forward GEMMs and fetch them again
(never saved) for the backward ones; each pass also starts the neighbour layer's page-in.

The model reaches these through the :class:`~moetrain.models.seam.ExpertWeights` protocol
(:meth:`ExpertWeightPager.run <moetrain.offload.weight_pager.ExpertWeightPager.run>` calls :func:`run_paged`).
Shapes: ``N`` expert-sorted rows, ``H`` hidden, ``I`` expert width, ``E`` experts.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moetrain.models.expert_grads import grad_anchor, trained_experts
from moetrain.models.experts import grouped_swiglu_backward, grouped_swiglu_forward
from moetrain.models.swiglu_kernel import silu_mul, silu_mul_backward


def run_paged(pager, layer: int, x_sorted: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor,
              params: list[nn.Parameter], *, grouped: bool, recomputing: bool) -> torch.Tensor:
    """(N, H) outputs of ``layer``'s experts over ``x_sorted`` (N, H) with paged weights; ``params`` (3 per
    expert, placeholders) receive the gradients. The host must know which experts to page in: the layer's one
    read of its ``counts`` (E,)."""
    sizes = counts.tolist()
    active = [e for e, n in enumerate(sizes) if n]
    pager.routed(layer, active)
    if grouped:
        return PagedGroupedSwiGLU.apply(x_sorted.contiguous(), offsets, counts > 0, pager, layer, active,
                                        recomputing, grad_anchor(params), params, trained_experts(params))
    return PagedLoopSwiGLU.apply(x_sorted, pager, layer, sizes, recomputing, *params)


class PagedGroupedSwiGLU(torch.autograd.Function):
    """:class:`~moetrain.models.experts.GroupedSwiGLU` with the weights paged in by an
    :class:`~moetrain.offload.weight_pager.ExpertWeightPager`: fetched for the forward GEMMs and fetched
    again (never saved) for the backward ones; each pass also starts the next layer's page-in.

    forward(x_sorted (N, H), offsets (E,) int32, has_rows (E,) bool, pager, layer, active (list of the
    experts with rows), recomputing, anchor, params (placeholders, 3 per expert), trained (expert indices)) -> (N, H)
    The weight gradients go into the placeholders' stacked ``.grad`` (:mod:`moetrain.models.expert_grads`);
    ``anchor`` (a trained placeholder, or None) only makes the output require a gradient.
    """

    @staticmethod
    def forward(ctx, x, offsets, has_rows, pager, layer, active, recomputing, anchor, params, trained):
        wg, wu, wd = pager.fetch(layer, active)
        y, g, u = grouped_swiglu_forward(x, offsets, wg=wg, wu=wu, wd=wd)
        pager.release(layer)
        _prefetch_next(pager, layer, +1, recomputing)
        ctx.save_for_backward(x, offsets, has_rows, g, u)
        ctx.pager, ctx.layer, ctx.active, ctx.params, ctx.trained = pager, layer, active, params, trained
        return y

    @staticmethod
    def backward(ctx, dy):
        x, offsets, has_rows, g, u = ctx.saved_tensors
        weights = ctx.pager.fetch(ctx.layer, ctx.active)
        _prefetch_next(ctx.pager, ctx.layer, -1, False)
        dx = grouped_swiglu_backward(dy, x, offsets, saved=(g, u, has_rows), weights=weights, params=ctx.params,
                                     trained=ctx.trained)
        ctx.pager.release(ctx.layer)
        return (dx, *[None] * 10)


class PagedLoopSwiGLU(torch.autograd.Function):
    """The per-expert loop with paged weights (CPU, or GPUs without the grouped kernel).

    Forward and backward run the very ops autograd runs for ``SwiGLU`` on a 2-D input (``mm`` with the
    transposed weight, ``silu``, ``mul``; in backward ``mm`` for both operands and ``silu_backward``), so
    the results equal the resident loop's bit for bit. Experts without rows get no gradient (``None``).

    forward(x_sorted (N, H), pager, layer, sizes (rows per expert, host list), recomputing, *expert_params)
    -> (N, H)
    """

    @staticmethod
    def forward(ctx, x, pager, layer, sizes, recomputing, *expert_params):
        active = [e for e, n in enumerate(sizes) if n]
        wg, wu, wd = pager.fetch(layer, active)
        pieces, saved, start = [], [], 0
        for n, w1, w2, w3 in zip(sizes, wg, wu, wd, strict=True):
            if n:
                xe = x[start:start + n]
                g = xe.mm(w1.to(x.dtype).t())
                u = xe.mm(w2.to(x.dtype).t())
                h = silu_mul(g, u)  # the resident loop's activation (the fused kernel on CUDA bf16): equal bits
                pieces.append(h.mm(w3.to(x.dtype).t()))
                saved += [g, u, h]
            start += n
        pager.release(layer)
        _prefetch_next(pager, layer, +1, recomputing)
        ctx.save_for_backward(x, *saved)
        ctx.pager, ctx.layer, ctx.sizes, ctx.active = pager, layer, sizes, active
        ctx.param_dtype = expert_params[0].dtype
        if not pieces:
            return x.new_zeros(x.shape)
        return torch.cat(pieces, 0)

    @staticmethod
    def backward(ctx, dy):
        x, *saved = ctx.saved_tensors
        dy = dy.to(x.dtype)
        wg, wu, wd = ctx.pager.fetch(ctx.layer, ctx.active)
        _prefetch_next(ctx.pager, ctx.layer, -1, False)
        dx = torch.zeros_like(x)
        pd = ctx.param_dtype
        grads: list = []
        start = 0
        trains = [any(ctx.needs_input_grad[i:i + 3]) for i in range(5, len(ctx.needs_input_grad), 3)]
        for e, (n, w1, w2, w3) in enumerate(zip(ctx.sizes, wg, wu, wd, strict=True)):
            if not n:
                grads += [None, None, None]
                continue
            g, u, h = saved[:3]
            saved = saved[3:]
            xe, dye = x[start:start + n], dy[start:start + n]
            dh = dye.mm(w3.to(x.dtype))
            dg, du, _ = silu_mul_backward(dh, g, u, with_h=False)
            dx[start:start + n] = dg.mm(w1.to(x.dtype)) + du.mm(w2.to(x.dtype))
            if trains[e]:
                grads += [dg.t().mm(xe).to(pd), du.t().mm(xe).to(pd), dye.t().mm(h).to(pd)]
            else:  # a frozen expert: no weight-gradient GEMMs
                grads += [None, None, None]
            start += n
        ctx.pager.release(ctx.layer)
        return (dx, None, None, None, None, *grads)


def _prefetch_next(pager, layer: int, direction: int, recomputing: bool) -> None:
    """Start paging in the neighbour layer of ``layer`` (``+1`` in forward: the experts it routed last
    time; ``-1`` in backward: the experts it routed in this forward)."""
    if direction > 0 and recomputing:  # a forward re-run inside backward: the next layer is done
        return
    nxt = pager.next_layer(layer, direction)
    if nxt is not None:
        pager.prefetch(nxt, pager.last_routed.get(nxt, []))
