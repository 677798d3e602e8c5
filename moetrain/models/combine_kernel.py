"""The MoE combine (unsort the expert outputs, weight them, sum each token's k of them) as one kernel each way.

``T`` tokens, ``k`` experts a token, ``N = T * k`` rows, ``H`` hidden::

    y        (N, H)  the experts' outputs, rows in expert order (bf16 | fp32)
    inverse  (N,)    int64, the sorted row of each token-major assignment t * k + j (a permutation)
    weight   (T, k)  combine weights (fp32 | bf16)
    out      (T, H)  out[t] = sum_j weight[t, j] * y[inverse[t * k + j]], in the caller's dtype

Unfused, the combine is an ``index_select`` of the N rows into token-major order (an (N, H) copy, kept alive for
the weights' gradient), a broadcast multiply by the weights (another (N, H) tensor) and a sum over k; its backward
is an expanded multiply of the output's gradient by the weights, a second multiply and reduction over H for the
weights' gradient, and an ``index_select`` back into expert order: six passes over (N, H) tensors (about 100 M
elements each at T = 8192, k = 6, H = 2048), by non-vectorized broadcast kernels, every layer. Fused
(:mod:`moetrain.models.combine_kernel_triton`), a program per token:

    forward   reads its k rows of ``y`` (gathered through ``inverse``) and writes its output row, summing in fp32
              in the fixed order j = 0 .. k-1 (deterministic, no atomics); nothing (N, H) is stored
    backward  reads the output's gradient row once and writes the k rows of dy = weight[t, j] * dout[t] straight
              into expert order (a permutation: each row written once, no atomics); when the weights need a
              gradient it also reads the k rows of ``y`` and reduces dout[t] . y_row in fp32 for each slot

The products are formed in fp32 and rounded once, into the output's (or dy's, dweight's) dtype. The eager path
(CPU, triton missing, or ``MOETRAIN_FUSED_COMBINE=0``) keeps the unfused formulas exactly, products in y's dtype
included, so CPU results do not move; the fused path differs from it by that bf16 rounding of the products only.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from moetrain.models.kernel_switch import launch_device, switched_on, triton_importable

KERNELS = "moetrain.models.combine_kernel_triton"
"""The kernels' module (it imports triton at the top)."""

ENV = "MOETRAIN_FUSED_COMBINE"
"""Environment variable: ``0`` forces the eager combine."""

MAX_BLOCK = 2048
"""Most columns of a forward program's tile (rows longer than it are walked in tiles); the tests shrink it."""

BWD_TILE = 4096
"""Elements of a backward program's (k rounded up to a power of two, columns) tile: 8 x 512 at k = 6, its fp32
accumulator 32 registers a thread under :data:`BWD_NUM_WARPS` warps."""

NUM_WARPS = 8
"""Warps a forward program: 2048 bf16 columns are then 8 a thread, one 16-byte load per row."""

BWD_NUM_WARPS = 4
"""Warps a backward program. Measured on an H200 at T = 8192, k = 6, H = 2048 (bf16 y): forward 64 us, backward
128 us with the weights' gradient and 67 us without (about 3.4 TB/s, near a plain copy's rate); 8 warps or
8 x 1024 tiles took 137-156 us."""


def enabled() -> bool:
    """False when ``MOETRAIN_FUSED_COMBINE=0`` forces the eager combine (read at every call: tests switch it)."""
    return switched_on(ENV)


def fused_available(y: torch.Tensor) -> bool:
    """The combine of ``y`` runs the Triton kernels: a CUDA tensor, triton importable, not switched off."""
    return y.is_cuda and enabled() and triton_importable()


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _fused_forward(y: torch.Tensor, inverse: torch.Tensor, weight: torch.Tensor,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """(T, H) ``out_dtype``: the forward kernel over contiguous ``y`` (N, H), ``inverse`` (N,), ``weight`` (T, k)."""
    kernels = importlib.import_module(KERNELS)
    tokens, k = weight.shape
    hidden = y.shape[1]
    out = torch.empty(tokens, hidden, dtype=out_dtype, device=y.device)
    if tokens and hidden:
        with launch_device(y.device):
            kernels._combine_fwd_kernel[(tokens,)](y, inverse, weight, out, hidden, K=k,
                                                   BLOCK=min(_pow2(hidden), MAX_BLOCK), num_warps=NUM_WARPS)
    return out


def _fused_backward(dout: torch.Tensor, y: Optional[torch.Tensor], inverse: torch.Tensor, weight: torch.Tensor, *,
                    y_grad: bool, y_like: tuple) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dy (N, H) or None, dweight (T, k) or None) from the backward kernel; ``y`` is needed (and given) only for
    the weights' gradient; ``y_like``: (N, H, y's dtype), for dy."""
    kernels = importlib.import_module(KERNELS)
    tokens, k = weight.shape
    rows, hidden, y_dtype = y_like
    dy = torch.empty(rows, hidden, dtype=y_dtype, device=dout.device) if y_grad else None
    dweight = torch.empty_like(weight) if y is not None else None
    if tokens and hidden:
        k_p2 = _pow2(k)
        block = max(1, min(_pow2(hidden), BWD_TILE // k_p2, MAX_BLOCK))
        with launch_device(dout.device):
            kernels._combine_bwd_kernel[(tokens,)](
                dout, y if y is not None else dout, inverse, weight, dy if dy is not None else dout,
                dweight if dweight is not None else weight, hidden, K=k, K_P2=k_p2, BLOCK=block, Y_GRAD=y_grad,
                WEIGHT_GRAD=y is not None, num_warps=BWD_NUM_WARPS)
    elif dweight is not None:
        dweight.zero_()
    return dy, dweight


def _eager_forward(y: torch.Tensor, inverse: torch.Tensor, weight: torch.Tensor,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """The unfused combine: gather (N, H) token-major, multiply in y's dtype, sum the k terms into ``out_dtype``."""
    tokens, k = weight.shape
    rows = y.index_select(0, inverse).view(tokens, k, y.shape[-1])  # (T, k, H)
    return (rows * weight.unsqueeze(-1).to(y.dtype)).sum(1, dtype=out_dtype)


def _eager_backward(dout: torch.Tensor, y: Optional[torch.Tensor], inverse: torch.Tensor, weight: torch.Tensor, *,
                    y_grad: bool, y_like: tuple) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """What autograd computes for :func:`_eager_forward`: the gradient enters y's dtype, dy is its product with
    the weights scattered back to expert order (``index_copy_`` of a permutation: each row written once), dweight
    the product with the gathered rows reduced over H in y's dtype, then cast to the weights' dtype."""
    tokens, k = weight.shape
    rows, hidden, y_dtype = y_like
    g = dout.to(y_dtype).unsqueeze(1)  # (T, 1, H)
    dy = dweight = None
    if y_grad:
        terms = (g * weight.unsqueeze(-1).to(y_dtype)).view(rows, hidden)  # (N, H) token-major
        dy = torch.empty(rows, hidden, dtype=y_dtype, device=dout.device).index_copy_(0, inverse, terms)
    if y is not None:
        gathered = y.index_select(0, inverse).view(tokens, k, hidden)
        dweight = (g * gathered).sum(-1).to(weight.dtype)
    return dy, dweight


class CombineRows(torch.autograd.Function):
    """:func:`combine_rows` with its backward: the Triton kernels (``fused``) or the eager formulas."""

    @staticmethod
    def forward(ctx, y, inverse, weight, out_dtype, fused):
        weight_grad = ctx.needs_input_grad[2]
        # y is kept only for the weights' gradient (the unfused path kept its (N, H) gathered copy for it)
        ctx.save_for_backward(y if weight_grad else None, inverse, weight)
        ctx.fused, ctx.y_like = fused, (*y.shape, y.dtype)
        run = _fused_forward if fused else _eager_forward
        return run(y, inverse, weight, out_dtype)

    @staticmethod
    def backward(ctx, dout):
        y, inverse, weight = ctx.saved_tensors
        y_grad = ctx.needs_input_grad[0]
        if not y_grad and y is None:
            return None, None, None, None, None
        if ctx.fused:
            dy, dweight = _fused_backward(dout.contiguous(), y, inverse, weight, y_grad=y_grad, y_like=ctx.y_like)
        else:
            dy, dweight = _eager_backward(dout, y, inverse, weight, y_grad=y_grad, y_like=ctx.y_like)
        return dy, None, dweight, None, None


def combine_rows(y: torch.Tensor, inverse: torch.Tensor, weight: torch.Tensor, *, out_dtype: torch.dtype,
                 fused: Optional[bool] = None) -> torch.Tensor:
    """(T, H) in ``out_dtype``: out[t] = sum_j weight[t, j] * y[inverse[t * k + j]] (see the module docstring).

    ``y`` (N, H) expert outputs in expert order, ``inverse`` (N,) int64 (the sorted row of assignment t * k + j),
    ``weight`` (T, k). Differentiable in ``y`` and ``weight``: dy (N, H) in y's dtype, dweight (T, k) in weight's
    dtype (skipped when ``weight`` needs no gradient). ``fused``: None picks the Triton kernels where
    :func:`fused_available`; True forces them (the interpreter tests run them on CPU tensors), False the eager path.
    """
    if fused is None:
        fused = fused_available(y)
    if fused:  # the kernels index flat memory: rows of H contiguous elements, k contiguous weights a token
        y, inverse, weight = y.contiguous(), inverse.to(torch.int64).contiguous(), weight.contiguous()
    return CombineRows.apply(y, inverse, weight, out_dtype, fused)
