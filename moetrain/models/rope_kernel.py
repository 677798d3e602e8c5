"""The rotary position embedding of a bf16 (or fp16) query or key, forward and backward in one Triton pass each.

The Hugging Face families rotate each head's halves ``x = [x1 | x2]`` (``h = hd / 2`` each) by the position's
angles: ``y = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2 | x1]``. Eagerly that is a ``neg``, a
``cat``, two ``mul`` and an ``add``, each a pass over the activation: on Qwen3-30B-A3B (4 x 4 096 tokens, 32 query and
4 key heads of 128, 48 layers) the ``cat`` alone took about 45 ms of a micro-batch's GPU time. Here::

    x (B, L, n, hd) contiguous        cos, sin (B or 1, L or 1, 1, hd): one row per token, shared by its n heads
    forward   reads x and the token's cos, sin rows, writes y        (1 pass; eager: neg, cat, mul, mul, add)
    backward  reads dy and the rows, writes dx                        (1 pass; eager: mul, mul, neg, cat, add)

    y[:h]  = r(r(x1 * cos[:h]) - r(x2 * sin[:h]))        dx[:h] = r(r(dy1 * cos[:h]) + r(dy2 * sin[h:]))
    y[h:]  = r(r(x2 * cos[h:]) + r(x1 * sin[h:]))        dx[h:] = r(r(dy2 * cos[h:]) - r(dy1 * sin[:h]))

``r`` rounds to ``x``'s dtype, to nearest even, exactly where the eager ops round: each ``mul`` and the ``add`` of
torch compute in fp32 and round their output. A product of two bf16 (or fp16) values is exact in fp32, and the sum
is the fp32 sum of the two rounded products, so the kernels are bit for bit the eager formula, forward and backward
(``dx`` as autograd computes it: the two products' gradients ``r(dy * cos)`` and ``rotate_half``'s transpose of
``r(dy * sin)``, ``(g[h:], -g[:h])``, added). The backward is the forward rotation by the negated angle with the sin
halves swapped, so one kernel body does both (``TRANSPOSED``). bf16 is rounded with integer arithmetic on the fp32
bits, which rounds to nearest even on the GPU and under Triton's interpreter alike (the interpreter's own fp32 ->
bf16 cast truncates): the CPU tests check bit equality with the very code the GPU runs; fp16 by the cast, with fused
multiply-adds off (the compiler would otherwise fold a product's rounding into the sum). Nothing is saved for
backward but the cos and sin tables, which the caller holds anyway. On an H200 (torch 2.11, Triton 3.6) Qwen3's
queries (4 x 4 096 x 32 x 128, bf16) took 0.10 ms forward against eager's 0.81, 0.33 ms forward and backward
against 1.61.

A program takes ``BLOCK_T`` tokens by ``BLOCK_N`` heads by ``BLOCK_H`` (the half ``h`` padded to a power of two), at
most :data:`TILE` elements a half; it reads the tokens' cos and sin rows once for all their heads (all 32 query
heads of 128 are one program's, two tokens at a time; the 4 key heads, 16 tokens). :func:`apply_rotary` runs the
kernels where :func:`kernel_applies` (triton imports, ``MOETRAIN_FUSED_ROPE`` is not ``0``, CUDA, bf16/fp16 with
cos/sin in ``x``'s dtype and taking no gradient, the layout above, an even head size of at most :data:`MAX_HEAD_DIM`),
and the eager formula elsewhere (the CPU, fp32, another layout: MLA's rotary slices). :func:`rotary_kernel` and
:func:`rotary_backward_kernel` launch unconditionally: on CPU tensors under ``TRITON_INTERPRET=1``, which is how the
CPU tests run them; under the interpreter the dispatcher takes CPU tensors too.
"""

from __future__ import annotations

import os

import torch

from moetrain.models.kernel_switch import launch_device, switched_on

try:
    import triton
    import triton.language as tl
except ImportError:  # the eager formula only
    triton = tl = None

ENV = "MOETRAIN_FUSED_ROPE"
"""Environment variable: ``0`` forces the eager formula."""

TILE = 4096
"""Elements of one half (``BLOCK_T * BLOCK_N * BLOCK_H``) a program handles."""

MAX_HEAD_DIM = 1024
"""The widest head the kernels take (half a head is at most one program's tile)."""

KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., hd) -> (..., hd): ``[x1 | x2] -> [-x2 | x1]``, the halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` by torch's ops, in any layout that broadcasts (the Hugging Face formula)."""
    return x * cos + rotate_half(x) * sin


def _launches_on(device: torch.device) -> bool:
    """Triton launches for tensors on ``device``: CUDA, or the CPU while Triton's interpreter is on (the CPU tests'
    child session; nothing sets ``TRITON_INTERPRET`` otherwise)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _table_fits(table: torch.Tensor, x: torch.Tensor) -> bool:
    """``table`` (cos or sin) is (B or 1, L or 1, 1, hd) for ``x`` (B, L, n, hd), in its dtype and on its device,
    with unit stride along hd, and takes no gradient (the kernels give it none)."""
    b, seq, _, hd = x.shape
    return (table.dim() == 4 and table.shape[0] in (1, b) and table.shape[1] in (1, seq) and table.shape[2] == 1
            and table.shape[3] == hd and table.stride(3) == 1 and table.dtype == x.dtype
            and table.device == x.device and not table.requires_grad)


def kernel_takes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """The kernels' operands, wherever they are: ``x`` (B, L, n, hd) contiguous in bf16 or fp16 with an even ``hd``
    of at most :data:`MAX_HEAD_DIM`, ``cos`` and ``sin`` as :func:`_table_fits` says."""
    return (x.dim() == 4 and x.dtype in KERNEL_DTYPES and x.is_contiguous() and x.shape[-1] % 2 == 0
            and 0 < x.shape[-1] <= MAX_HEAD_DIM and _table_fits(cos, x) and _table_fits(sin, x))


def kernel_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """:func:`apply_rotary` runs the kernels: triton imports, the switch is on, they launch on ``x``'s device (CUDA)
    and :func:`kernel_takes` the operands."""
    return triton is not None and switched_on(ENV) and _launches_on(x.device) and kernel_takes(x, cos, sin)


def _blocks(heads: int, half: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_N, BLOCK_H, num_warps) for ``heads`` heads of halves ``half``."""
    block_h = triton.next_power_of_2(half)
    block_n = min(triton.next_power_of_2(heads), max(1, TILE // block_h))
    block_t = max(1, TILE // (block_n * block_h))
    return block_t, block_n, block_h, 4 if block_t * block_n * block_h <= 2048 else 8


if triton is not None:

    @triton.jit
    def _round(v, BF16: tl.constexpr):
        """fp32 ``v`` rounded to bf16 (``BF16``) or fp16, to nearest even, returned in fp32. bf16 by the fp32 bits:
        add half an ulp of the kept 16 bits, less one unless the last kept bit is odd, and drop the low 16 bits
        (NaN kept as it is: the add would make some of them inf)."""
        if BF16:
            bits = v.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
        else:
            return v.to(tl.float16).to(tl.float32)

    @triton.jit
    def _rotate(x_ptr, cos_ptr, sin_ptr, y_ptr, tokens, seq, heads, half, cos_sb, cos_sl, sin_sb, sin_sl,
                BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BF16: tl.constexpr,
                TRANSPOSED: tl.constexpr):
        """y = R x (or R^T x: ``TRANSPOSED``, the backward) for ``BLOCK_T`` tokens by ``BLOCK_N`` heads; x, y
        (tokens, heads, 2 * half) contiguous; token t's cos/sin row at ``(t // seq) * s_b + (t % seq) * s_l``."""
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        i = tl.arange(0, BLOCK_H)
        tmask, imask = t < tokens, i < half
        rmask = tmask[:, None] & imask[None, :]  # (BLOCK_T, BLOCK_H): the tokens' table rows
        cos_at = cos_ptr + ((t // seq) * cos_sb + (t % seq) * cos_sl)[:, None] + i[None, :]
        sin_at = sin_ptr + ((t // seq) * sin_sb + (t % seq) * sin_sl)[:, None] + i[None, :]
        c1 = tl.load(cos_at, mask=rmask, other=0.0).to(tl.float32)[:, None, :]
        c2 = tl.load(cos_at + half, mask=rmask, other=0.0).to(tl.float32)[:, None, :]
        s1 = tl.load(sin_at, mask=rmask, other=0.0).to(tl.float32)[:, None, :]
        s2 = tl.load(sin_at + half, mask=rmask, other=0.0).to(tl.float32)[:, None, :]
        if TRANSPOSED:  # R^T: the rotation by -angle with the sin halves swapped
            s1, s2 = -s2, -s1
        offs = (t[:, None, None] * heads + n[None, :, None]) * (2 * half) + i[None, None, :]  # int64
        mask = tmask[:, None, None] & (n < heads)[None, :, None] & imask[None, None, :]
        x1 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + offs + half, mask=mask, other=0.0).to(tl.float32)
        y1 = _round(_round(x1 * c1, BF16) - _round(x2 * s1, BF16), BF16)
        y2 = _round(_round(x2 * c2, BF16) + _round(x1 * s2, BF16), BF16)
        dtype = y_ptr.dtype.element_ty
        tl.store(y_ptr + offs, y1.to(dtype), mask=mask)  # exact: y1, y2 already hold values of dtype
        tl.store(y_ptr + offs + half, y2.to(dtype), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, transposed: bool) -> torch.Tensor:
    """R x or R^T x of ``x`` (B, L, n, hd) contiguous by :func:`_rotate`; cos, sin (B or 1, L or 1, 1, hd)."""
    b, seq, heads, hd = x.shape
    y = torch.empty_like(x)
    if x.numel():
        block_t, block_n, block_h, warps = _blocks(heads, hd // 2)
        grid = (triton.cdiv(b * seq, block_t), triton.cdiv(heads, block_n))

        def strides(table: torch.Tensor) -> tuple[int, int]:  # a broadcast dim (size 1) repeats its one row
            return (table.stride(0) if table.shape[0] > 1 else 0), (table.stride(1) if table.shape[1] > 1 else 0)

        # no fused multiply-adds: the compiler may narrow fp16's rounded products and their fp32 sum to fp16
        # operations, then fuse a product into the sum, skipping the product's rounding that the eager formula makes
        with launch_device(x.device):
            _rotate[grid](x, cos, sin, y, b * seq, seq, heads, hd // 2, *strides(cos), *strides(sin),
                          BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_H=block_h, BF16=x.dtype == torch.bfloat16,
                          TRANSPOSED=transposed, num_warps=warps, enable_fp_fusion=False)
    return y


def rotary_kernel(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """y (B, L, n, hd) = ``x * cos + rotate_half(x) * sin`` by the Triton kernel, whatever the device (the CPU under
    ``TRITON_INTERPRET=1``); operands as :func:`kernel_takes` says."""
    return _launch(x, cos, sin, transposed=False)


def rotary_backward_kernel(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """dx (B, L, n, hd) of :func:`rotary_kernel` for ``dy`` (B, L, n, hd) contiguous, by the Triton kernel."""
    return _launch(dy, cos, sin, transposed=True)


class _RotaryFn(torch.autograd.Function):
    """:func:`rotary_kernel` under autograd: saves the cos and sin tables only; they take no gradient."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotary_kernel(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rotary_backward_kernel(dy.contiguous(), cos, sin), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``: the kernels where :func:`kernel_applies` (``x`` (B, L, n, hd), ``cos``
    and ``sin`` (B, L, 1, hd) or broadcast along B or L), else the eager formula, for any operands it broadcasts."""
    if kernel_applies(x, cos, sin):
        return _RotaryFn.apply(x, cos, sin)
    return rotary_eager(x, cos, sin)
