"""Triton kernels of the fused MoE combine; only :mod:`moetrain.models.combine_kernel` imports this module, lazily
(it imports triton at the top). The kernels' names are private: Triton passes their parameters by position, and
nothing outside that module (and the tests) calls them.

A program owns one token ``t``: its ``K`` assignments ``t * K + j`` and their sorted rows ``inverse[t * K + j]``
of the expert outputs. Rows are ``H`` contiguous elements (the caller makes every tensor contiguous), walked in
tiles of ``BLOCK`` columns; row offsets are int64 (``N * H`` passes 2^31 at DeepSeek sizes). Only long-standing
Triton features are used, so that the Triton a CUDA build of torch brings along compiles them, and both run under
Triton's CPU interpreter (``TRITON_INTERPRET=1``, how the CPU tests run them).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _combine_fwd_kernel(y_ptr, inverse_ptr, weight_ptr, out_ptr, H, K: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = sum_j weight[t, j] * y[inverse[t * K + j]], in fp32, j = 0 .. K-1 in order.

    ``y`` (N, H) bf16 | fp32 in expert order, ``inverse`` (N,) int64, ``weight`` (T, K) fp32 | bf16, ``out``
    (T, H) in any float dtype (the sum is rounded once, into it). Grid: (T,).
    """
    t = tl.program_id(0).to(tl.int64)
    cols0 = tl.arange(0, BLOCK)
    for h0 in range(0, H, BLOCK):
        cols = h0 + cols0
        mask = cols < H
        acc = tl.zeros((BLOCK,), tl.float32)
        for j in tl.static_range(K):  # unrolled: the K row loads are independent and issue together
            row = tl.load(inverse_ptr + t * K + j)
            w = tl.load(weight_ptr + t * K + j).to(tl.float32)
            acc += w * tl.load(y_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(dout_ptr, y_ptr, inverse_ptr, weight_ptr, dy_ptr, dweight_ptr, H, K: tl.constexpr,
                        K_P2: tl.constexpr, BLOCK: tl.constexpr, Y_GRAD: tl.constexpr, WEIGHT_GRAD: tl.constexpr):
    """Under ``Y_GRAD``, dy[inverse[t * K + j]] = weight[t, j] * dout[t] (each row of ``dy`` written once: a
    permutation); under ``WEIGHT_GRAD``, dweight[t, j] = sum_h dout[t, h] * y[inverse[t * K + j], h] in fp32.

    ``dout`` (T, H) bf16 | fp32, read once; ``y`` (N, H) read only under ``WEIGHT_GRAD``; ``dy`` (N, H) in y's
    dtype; ``dweight`` (T, K) in weight's dtype. The K rows of a token are one (K_P2, BLOCK) tile (K_P2: K rounded
    up to a power of two, the padding masked off), so the per-slot dot products accumulate side by side and one
    reduction at the end gives all K of them: no second kernel, no atomics. Grid: (T,).
    """
    t = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, K_P2)
    used = slots < K
    rows = tl.load(inverse_ptr + t * K + slots, mask=used, other=0)  # (K_P2,) int64
    w = tl.load(weight_ptr + t * K + slots, mask=used, other=0.0).to(tl.float32)
    cols0 = tl.arange(0, BLOCK)
    acc = tl.zeros((K_P2, BLOCK), tl.float32)
    for h0 in range(0, H, BLOCK):
        cols = h0 + cols0
        in_row = cols < H
        mask = used[:, None] & in_row[None, :]
        g = tl.load(dout_ptr + t * H + cols, mask=in_row, other=0.0).to(tl.float32)
        at = rows[:, None] * H + cols[None, :]
        if Y_GRAD:
            tl.store(dy_ptr + at, (w[:, None] * g[None, :]).to(dy_ptr.dtype.element_ty), mask=mask)
        if WEIGHT_GRAD:
            acc += g[None, :] * tl.load(y_ptr + at, mask=mask, other=0.0).to(tl.float32)
    if WEIGHT_GRAD:
        tl.store(dweight_ptr + t * K + slots, tl.sum(acc, axis=1).to(dweight_ptr.dtype.element_ty), mask=used)
