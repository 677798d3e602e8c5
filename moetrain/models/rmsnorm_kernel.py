"""RMSNorm of a bf16 (or fp16) activation, forward and backward in one Triton kernel each.

:class:`moetrain.models.attention.RMSNorm` computes as the Hugging Face families write it: the input cast to fp32,
normalized, cast back, then multiplied by the weight (cast to the input's dtype under autocast)::

    y = w_r * round(x * rsqrt(mean(x^2) + eps))        x (M, D) bf16; round: to x's dtype; w_r = round(w)

Eagerly that is an fp32 copy of ``x``, the norm, a copy back and a multiply forward, and about twice as many passes
backward, several of them over fp32 tensors: on Qwen3-30B-A3B, whose attention normalizes every query and key head
(q_norm, k_norm on (tokens x heads, 128) rows) besides the two norms of each layer, these elementwise passes and
copies were 40% of a compute-only micro-batch's GPU time (run r42). Here::

    forward   reads x, w          writes y and rstd (M,) fp32                       (1 pass)
    backward  reads dy, x, w, rstd  writes dx and a (programs, D) fp32 partial sum of dw  (1 pass, then a sum)

    n = x * rstd;  g = dy * w_r;  dx = rstd * (g - n * mean(g * n));  dw = sum over rows of dy * round(n)

The math is fp32 in registers; ``y`` and ``dx`` are rounded once to ``x``'s dtype (the eager path rounds ``dy * w_r``
first too: the two agree to about an ulp), ``dw`` is summed in fp32 and returned in ``w``'s dtype. Only ``x`` (in
its own dtype) and ``rstd`` are saved for backward, where eager autograd keeps an fp32 copy of ``x``.

A program takes :data:`TILE` elements: ``BLOCK_M`` whole rows of ``BLOCK_D`` (``D`` padded to a power of two), so
rows of 128 go 32 to a program and rows of 2 048 two. :func:`rms_norm` runs the kernels for contiguous bf16/fp16
CUDA inputs whose output keeps their dtype (the weight in that dtype, or cast to it under autocast), rows of at
most :data:`MAX_D`, when triton imports and ``MOETRAIN_FUSED_RMSNORM`` is not ``0``; everything else (the CPU, fp32,
an fp32 output) takes the eager formula. :func:`rms_norm_kernel` launches unconditionally: under
``TRITON_INTERPRET=1`` on CPU tensors, which is how the CPU tests run it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moetrain.models.kernel_switch import launch_device, switched_on

try:
    import triton
    import triton.language as tl
except ImportError:  # the eager formula only
    triton = tl = None

ENV = "MOETRAIN_FUSED_RMSNORM"
"""Environment variable: ``0`` forces the eager formula."""

TILE = 4096
"""Elements a program handles (``BLOCK_M`` rows of ``BLOCK_D``; one row when a row is longer)."""

MAX_D = 16384
"""The longest row the kernels take (a row is one program's registers)."""

KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The kernels take ``x`` (..., D) with ``weight`` (D,): triton imports, the switch is on, ``x`` is a contiguous
    CUDA tensor of a kernel dtype with rows of at most :data:`MAX_D`, the weight on its device, and the output keeps
    ``x``'s dtype (the weight in it, or cast to it under autocast, as :class:`~moetrain.models.attention.RMSNorm`
    does)."""
    same = weight.dtype == x.dtype or torch.is_autocast_enabled(x.device.type)
    return (triton is not None and switched_on(ENV) and x.is_cuda and x.dtype in KERNEL_DTYPES and same
            and x.is_contiguous() and 0 < x.shape[-1] <= MAX_D and weight.device == x.device
            and weight.shape == (x.shape[-1],))


def _blocks(d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) for rows of ``d``."""
    block_d = triton.next_power_of_2(d)
    block_m = max(1, TILE // block_d)
    return block_m, block_d, 4 if block_m * block_d <= 4096 else 8


if triton is not None:

    @triton.jit
    def _rms_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, m, d, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """y = round(w) * round(x * rstd) and rstd = rsqrt(mean(x^2) + eps) for ``BLOCK_M`` rows of ``d``."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        rmask, cmask = rows < m, cols < d
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * d + cols[None, :]  # int64: m * d may pass 2**31
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / d + eps)
        dtype = y_ptr.dtype.element_ty
        n = (x * rstd[:, None]).to(dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(dtype).to(tl.float32)
        tl.store(y_ptr + offs, (w[None, :] * n).to(dtype), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)

    @triton.jit
    def _rms_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, m, d, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """dx of ``BLOCK_M`` rows, and this program's partial sum of dw (row ``program_id`` of ``dw_ptr``)."""
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        rmask, cmask = rows < m, cols < d
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * d + cols[None, :]
        dtype = dx_ptr.dtype.element_ty
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(dtype).to(tl.float32)
        n = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * n, axis=1) / d
        tl.store(dx_ptr + offs, (rstd[:, None] * (g - n * c[:, None])).to(dtype), mask=mask)
        tl.store(dw_ptr + pid * d + cols, tl.sum(dy * n.to(dtype).to(tl.float32), axis=0), mask=cmask)


def rms_norm_kernel(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (M, D) in ``x``'s dtype, rstd (M,) fp32) of ``x`` (M, D) contiguous and ``weight`` (D,) by the Triton
    kernel, whatever the device (the CPU under ``TRITON_INTERPRET=1``)."""
    m, d = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block_m, block_d, warps = _blocks(d)
        with launch_device(x.device):
            _rms_fwd[(triton.cdiv(m, block_m),)](x, weight, y, rstd, m, d, eps, BLOCK_M=block_m, BLOCK_D=block_d,
                                                 num_warps=warps)
    return y, rstd


def rms_norm_backward_kernel(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, *,
                             rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (M, D) in ``x``'s dtype, dw (D,) in ``weight``'s dtype) by the Triton kernel; ``dy``, ``x`` (M, D)
    contiguous, ``rstd`` (M,) from :func:`rms_norm_kernel`."""
    m, d = x.shape
    dx = torch.empty_like(x)
    if not m:
        return dx, torch.zeros_like(weight)
    block_m, block_d, warps = _blocks(d)
    programs = triton.cdiv(m, block_m)
    partial = torch.empty(programs, d, dtype=torch.float32, device=x.device)  # (programs, D): one row a program
    with launch_device(x.device):
        _rms_bwd[(programs,)](dy, x, weight, rstd, dx, partial, m, d, BLOCK_M=block_m, BLOCK_D=block_d,
                              num_warps=warps)
    return dx, partial.sum(0).to(weight.dtype)


def rms_norm_eager(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Hugging Face formula (see the module docstring) by torch's ops: fp32 norm, cast back, weight multiply
    (the weight cast to ``x``'s dtype under autocast, where a bf16 residual stream keeps bf16 outputs)."""
    dtype = x.dtype
    n = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    if weight.dtype != dtype and torch.is_autocast_enabled(x.device.type):
        weight = weight.to(dtype)
    return weight * n.to(dtype)


class _RMSNormFn(torch.autograd.Function):
    """:func:`rms_norm_kernel` under autograd: saves ``x`` and ``rstd``; backward is one kernel pass and a sum."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rows = x.reshape(-1, x.shape[-1])
        y, rstd = rms_norm_kernel(rows, weight, eps)
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        rows, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward_kernel(dy.reshape(rows.shape).contiguous(), rows, weight, rstd=rstd)
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` (..., D) with ``weight`` (D,): the kernels where :func:`kernel_applies`, else eager."""
    if kernel_applies(x, weight):
        return _RMSNormFn.apply(x, weight, eps)
    return rms_norm_eager(x, weight, eps)

