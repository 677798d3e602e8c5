"""Routed experts: dispatch tokens grouped by expert, run each expert's SwiGLU MLP, combine.

Two compute paths, chosen per call:

* ``grouped``: one ``torch._grouped_mm`` per projection over all experts (CUDA, bf16). Token counts
  stay on the device: the path never reads a GPU value on the host, so transfers queued on side
  streams keep overlapping with it. Idle experts receive zero gradients; the sparse
  optimizer knows the active set from the routing counts. The weight gradients go into one stacked tensor
  per layer and matrix whose slices are the experts' ``.grad`` (:mod:`moetrain.models.expert_grads`): three
  adds a layer instead of one autograd accumulation per expert parameter. Frozen experts
  (``requires_grad`` off) receive none, and a layer with no trained expert runs no weight-gradient GEMM.
* paged (``resident_weights: no``): the attached :class:`~moetrain.models.seam.ExpertWeights` runs the
  experts (its autograd functions live in :mod:`moetrain.offload.paged_experts`).
* ``loop``: per-expert matmuls (CPU, or any dtype/shape the grouped kernel rejects). Experts that
  got no tokens do not run, so their ``.grad`` stays ``None`` exactly as in plain PyTorch.

Shapes: ``T`` tokens, ``H`` hidden, ``I`` expert width, ``E`` experts, ``k`` top-k, ``N = T * k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from moetrain.models.combine_kernel import combine_rows
from moetrain.models.expert_grads import accumulate_expert_grads, empty_groups_read_zero, grad_anchor, trained_experts
from moetrain.models.router import Routing
from moetrain.models.seam import ExpertWeights
from moetrain.models.swiglu_kernel import silu_mul, silu_mul_backward, swiglu_act


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); used for dense MLPs, shared experts and routed experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu_act(self.gate_proj(x), self.up_proj(x)))


@dataclass
class Dispatch:
    """Tokens sorted by expert.

    Attributes:
        token_of: (N,) index of the source token of each sorted row.
        counts: (E,) rows per expert (device).
        offsets: (E,) int32 cumulative end offsets, as ``torch._grouped_mm`` takes them.
        order: (N,) the token-major assignment (``t * k + slot``) of each sorted row.
        inverse: (N,) the sorted row of each token-major assignment (``order``'s inverse permutation).
        token_weight: (T, k) combine weights in token-major order.
    """

    token_of: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor
    token_weight: torch.Tensor


def dispatch(routing: Routing) -> Dispatch:
    """Group the (token, slot) assignments of ``routing`` by expert without a host sync."""
    k = routing.topk_idx.shape[1]
    flat = routing.topk_idx.reshape(-1)  # (N,)
    order = torch.argsort(flat, stable=True)  # rows of expert 0 first, then 1, ...
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return Dispatch(
        token_of=order // k,
        counts=routing.counts,
        offsets=torch.cumsum(routing.counts, 0).to(torch.int32),
        order=order,
        inverse=inverse,
        token_weight=routing.topk_weight,
    )


class _SortRows(torch.autograd.Function):
    """x (T, H) -> its rows in expert order (N, H); backward gathers each token's k rows back and sums them
    (autograd's own backward of ``x[token_of]`` accumulates with a sort-based scatter)."""

    @staticmethod
    def forward(ctx, x, token_of, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, token_of)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        rows = grad.index_select(0, inverse)  # (N, H), token-major
        return rows.view(-1, ctx.k, rows.shape[-1]).sum(1), None, None, None


def sort_rows(x: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """x (T, H) -> (N, H): each token's row once per expert it routes to, grouped by expert."""
    return _SortRows.apply(x, d.token_of, d.inverse, d.token_weight.shape[1])


def combine(y: torch.Tensor, d: Dispatch, dtype: torch.dtype) -> torch.Tensor:
    """(T, H) in ``dtype``: each token's sum over its k experts of weight * output, from ``y`` (N, H) in expert
    order. On CUDA one Triton kernel each way (fp32 sums in a fixed order, no atomics; see
    :mod:`moetrain.models.combine_kernel`); elsewhere the unfused gather, multiply and sum."""
    return combine_rows(y, d.inverse, d.token_weight, out_dtype=dtype)


def grouped_mm_available(x: torch.Tensor, hidden: int, width: int) -> bool:
    """Whether ``torch._grouped_mm`` is the fast path here (CUDA sm90+, bf16, 16-byte aligned dims)."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and hidden % 8 == 0
        and width % 8 == 0
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


def choose_grouped(impl: str, x: torch.Tensor, *, hidden: int, width: int) -> bool:
    """Whether expert ``impl`` (``auto``, ``grouped`` or ``loop``) runs grouped GEMMs on rows ``x`` (N, H):
    ``grouped`` forces them (the CPU too, for tests), ``auto`` takes them where :func:`grouped_mm_available`."""
    if impl == "loop":
        return False
    if impl == "grouped":
        if not hasattr(torch, "_grouped_mm"):
            raise RuntimeError("expert impl 'grouped' needs torch._grouped_mm (torch >= 2.8); use 'auto' or 'loop'")
        return True
    return grouped_mm_available(x, hidden, width)


def grouped_swiglu_forward(x: torch.Tensor, offsets: torch.Tensor, *, wg: torch.Tensor, wu: torch.Tensor,
                           wd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (N, H), g (N, I), u (N, I)) of every expert's SwiGLU over expert-sorted rows ``x`` (N, H);
    ``wg``/``wu`` (E, I, H), ``wd`` (E, H, I) in ``x``'s dtype."""
    g = torch._grouped_mm(x, wg.transpose(1, 2), offs=offsets)  # (N, I)
    u = torch._grouped_mm(x, wu.transpose(1, 2), offs=offsets)  # (N, I)
    y = torch._grouped_mm(silu_mul(g, u), wd.transpose(1, 2), offs=offsets)  # (N, H); one fused pass for h
    return y, g, u


def grouped_swiglu_backward(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, *, saved: tuple,
                            weights: tuple, params: list[nn.Parameter], trained: list[int]) -> torch.Tensor:
    """dx (N, H) of :func:`grouped_swiglu_forward`; the trained experts' weight gradients are added to their
    ``.grad`` (:func:`~moetrain.models.expert_grads.accumulate_expert_grads`), not returned.

    ``saved``: (g, u) (N, I) and ``has_rows`` (E,) bool from forward; ``weights``: (wg, wu, wd) in ``x``'s dtype;
    ``params``: the experts' parameters (3 per expert, they set the gradients' dtype); ``trained``: the experts whose
    weights train. An idle expert's gradient is zero; a frozen expert's stays None, and when no expert of the layer
    trains the three weight-gradient GEMMs are skipped (dx only)."""
    g, u, has_rows = saved
    wg, wu, wd = weights
    dy = dy.to(x.dtype).contiguous()
    dh = torch._grouped_mm(dy, wd, offs=offsets)  # (N, I) = dy_e @ w_down_e
    # one pass over dh, g, u for dg = dh * u * silu'(g), du = dh * silu(g) and h = silu(g) * u (the down
    # projection's input, not saved from forward; not written for a frozen layer): fp32 math, one rounding each
    dg, du, h = silu_mul_backward(dh, g, u, with_h=bool(trained))
    dx = torch._grouped_mm(dg, wg, offs=offsets) + torch._grouped_mm(du, wu, offs=offsets)  # (N, H)
    if not trained:  # a frozen layer: the input gradient only
        return dx
    # Weight grads: groups along the token dimension. An expert with no rows must read as zero; the kernels
    # here write zeros for empty groups (probed once per device), else a masking pass makes them.
    d_w = [torch._grouped_mm(dg.t(), x, offs=offsets),  # (E, I, H)
           torch._grouped_mm(du.t(), x, offs=offsets),  # (E, I, H)
           torch._grouped_mm(dy.t(), h, offs=offsets)]  # (E, H, I)
    if not empty_groups_read_zero(x.device):
        d_w = [torch.where(has_rows[:, None, None], d, 0) for d in d_w]
    if len(trained) < wg.shape[0]:  # some experts are frozen: keep only the trained ones' gradient memory
        index = torch.tensor(trained, device=x.device)
        d_w = [d.index_select(0, index) for d in d_w]
    dtype = params[3 * trained[0]].dtype
    accumulate_expert_grads(params, [d.to(dtype) for d in d_w], trained=trained)
    return dx


class GroupedSwiGLU(torch.autograd.Function):
    """All experts' SwiGLU over expert-sorted rows with three grouped GEMMs, forward and backward.

    The math runs on the packed (E, ...) tensors the per-expert parameters are views of (no per-call
    ``torch.stack`` copy of the weights). The weight gradients go straight into stacked ``.grad`` buffers
    (:mod:`moetrain.models.expert_grads`) instead of through autograd, so no parameter is an input: ``anchor``
    (a trained expert parameter, or None) only makes the output require a gradient.

    forward(x_sorted (N, H), offsets (E,) int32, has_rows (E,) bool, packed (w_gate (E, I, H), w_up (E, I, H),
    w_down (E, H, I)), anchor, params (3 per expert), trained (expert indices)) -> (N, H)
    """

    @staticmethod
    def forward(ctx, x, offsets, has_rows, packed, anchor, params, trained):
        dt = x.dtype
        wg, wu, wd = (w.to(dt) for w in packed)
        y, g, u = grouped_swiglu_forward(x, offsets, wg=wg, wu=wu, wd=wd)
        ctx.save_for_backward(x, offsets, has_rows, g, u, wg, wu, wd)
        ctx.params, ctx.trained = params, trained
        return y

    @staticmethod
    def backward(ctx, dy):
        x, offsets, has_rows, g, u, wg, wu, wd = ctx.saved_tensors
        dx = grouped_swiglu_backward(dy, x, offsets, saved=(g, u, has_rows), weights=(wg, wu, wd),
                                     params=ctx.params, trained=ctx.trained)
        return dx, None, None, None, None, None, None


def run_grouped(x_sorted: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor, *,
                packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor], params: list[nn.Parameter]) -> torch.Tensor:
    """(N, H) outputs of every expert over expert-sorted ``x_sorted`` (N, H) with :class:`GroupedSwiGLU`;
    ``counts`` (E,) rows per expert, ``offsets`` their int32 cumulative ends, ``packed`` the (E, ...) weights whose
    slices are ``params`` (gate, up, down per expert)."""
    trained = trained_experts(params)
    return GroupedSwiGLU.apply(x_sorted.contiguous(), offsets, counts > 0, packed, grad_anchor(params), params,
                               trained)


class RoutedExperts(nn.ModuleList):
    """E independent SwiGLU experts: ``self[e].{gate,up,down}_proj.weight`` are separate parameters
    (Hugging Face names ``mlp.experts.{e}.*``), so each expert can be a separate record in the
    offload store and an idle expert's ``.grad`` can stay ``None``.

    ``impl`` is ``auto`` (grouped where supported, else loop), ``grouped`` or ``loop``.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, impl: str = "auto", *,
                 layer_idx: int = -1) -> None:
        super().__init__(SwiGLU(hidden_size, intermediate_size) for _ in range(num_experts))
        # paged compute weights (resident_weights: no), attached by MoEForCausalLM.attach_offload
        self.pager: Optional[ExpertWeights] = None
        self.layer_idx = layer_idx  # the MoE layer these experts belong to (the pager's rows are per layer)
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.impl = impl

    def _apply(self, fn, recurse: bool = True):
        # With paged weights the parameters are one-element placeholders of the full shape: moving or
        # casting them (Lightning moves the model to the CPU at teardown) would allocate every expert's
        # weights at full size. Their values live in the pager, so they stay as they are.
        if getattr(self, "pager", None) is not None:  # (subclasses such as expert parallel's set no pager)
            return self
        return super()._apply(fn, recurse)

    def use_grouped(self, x: torch.Tensor) -> bool:
        """``auto`` takes the grouped path where it is fast; ``grouped`` forces it (CPU too, for tests)."""
        return choose_grouped(self.impl, x, hidden=self.hidden_size, width=self.intermediate_size)

    def packed_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(E, I, H), (E, I, H), (E, H, I) tensors whose slices ARE the experts' parameters.

        Packing happens once (and again only if something replaced a parameter's storage, e.g.
        ``module.to()``); afterwards in-place optimizer updates keep the views valid.
        """
        packed = []
        for name in ("gate_proj", "up_proj", "down_proj"):
            params = [getattr(e, name).weight for e in self]
            first = params[0]
            step = first.numel()
            base = first.data_ptr()
            is_packed = all(
                p.data_ptr() == base + i * step * p.element_size() and p.is_contiguous()
                and p.dtype == first.dtype and p.device == first.device
                for i, p in enumerate(params)
            ) and first.untyped_storage().nbytes() >= step * len(params) * first.element_size()
            if is_packed:
                stacked = first.detach().as_strided((len(params), *first.shape), (step, *first.stride()))
            else:
                stacked = torch.stack([p.detach() for p in params])
                for i, p in enumerate(params):
                    p.data = stacked[i]
            packed.append(stacked)
        return packed[0], packed[1], packed[2]

    def forward(self, x: torch.Tensor, routing: Routing, *, recomputing: bool = False) -> torch.Tensor:
        """x: (T, H); returns (T, H) = sum over chosen experts of weight * expert(x). ``recomputing``: this is the
        re-run of a checkpointed layer in backward (paged weights then prefetch no layer after this one)."""
        d = dispatch(routing)
        x_sorted = sort_rows(x, d)  # (N, H)
        if torch.is_autocast_enabled(x.device.type):
            # The grouped kernel is outside autocast's op list: cast the rows to the autocast dtype here.
            x_sorted = x_sorted.to(torch.get_autocast_dtype(x.device.type))
        if self.pager is not None:
            params = [p for e in self for p in (e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight)]
            y = self.pager.run(self.layer_idx, x_sorted, d.counts, d.offsets, params,
                               grouped=self.use_grouped(x_sorted), recomputing=recomputing)
        elif self.use_grouped(x_sorted):
            y = self._grouped(x_sorted, d.counts, d.offsets)
        else:
            y = self._loop(x_sorted, d.counts)
        return combine(y, d, x.dtype)

    def _grouped(self, x_sorted: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        params = [p for e in self for p in (e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight)]
        return run_grouped(x_sorted, counts, offsets, packed=self.packed_weights(), params=params)

    def _loop(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # One host read of the counts; fine on the CPU, and the fallback on GPUs without grouped GEMM.
        sizes = counts.tolist()
        pieces = []
        start = 0
        for e, n in enumerate(sizes):
            if n:
                pieces.append(self[e](x_sorted[start:start + n]))
            start += n
        if not pieces:
            return x_sorted.new_zeros(x_sorted.shape)
        return torch.cat(pieces, 0)
