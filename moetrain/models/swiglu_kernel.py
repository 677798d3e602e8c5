"""The SwiGLU activation ``h = silu(g) * u`` and its backward, one Triton kernel each.

The experts' activations are the largest elementwise tensors of a step: ``g``, ``u`` and ``h`` are (N, I) each
(N = T * k expert-sorted rows, I the expert width; 49152 x 1408 bf16 for the routed experts of a DeepSeek-MoE-16B
micro-batch, 8192 x 2816 for its shared experts), so each pass over them is a read or write of ~140 MB. Eager
PyTorch takes two passes forward (``silu``, then ``mul``: ``silu(g)`` written and read back) and five backward
(``silu(g)``, ``dh * u``, ``silu_backward``, ``dh * silu(g)``, and ``silu(g) * u`` recomputed for the
down-projection's weight gradient). Here::

    forward   silu_mul(g, u)               reads g, u          writes h                  (1 pass)
    backward  silu_mul_backward(dh, g, u)  reads dh, g, u      writes dg, du and h       (1 pass)

    s = sigmoid(g);  h = g * s * u;  du = dh * g * s;  dg = dh * u * s * (1 + g * (1 - s))   (silu'(g), the last
    factor, needs no exp beyond the one sigmoid takes)

``h`` comes out of the backward for the grouped experts' down-projection weight gradient (it was not saved from
forward, to keep activation memory at ``g`` and ``u``); :class:`SiluMul` (dense and shared SwiGLU modules, whose
``down_proj`` saves ``h`` itself) asks the kernel not to write it.

The math is fp32 in registers, stored in the inputs' dtype (bf16, fp16 or fp32): one rounding per output. Offsets
are int64 (a tensor may hold more than 2**31 elements). :func:`silu_mul` and :func:`silu_mul_backward` launch them
on contiguous bf16 or fp16 CUDA tensors of one shape when triton imports; everything else takes the eager formulas
(autograd's own ops, which agree with the kernels to about an ulp): the CPU, other layouts,
``MOETRAIN_FUSED_SWIGLU=0`` (read at every call, so that benchmarks can switch it), and fp32. fp32 stays eager
because the fp32 exactness tests hold other paths (the paged per-expert loop of
:mod:`moetrain.offload.paged_experts` against the resident loop) to autograd's bits, and fp32 is not a training
compute dtype, where the traffic matters. :func:`silu_mul_kernel` and :func:`silu_mul_backward_kernel`
launch them unconditionally; under ``TRITON_INTERPRET=1`` (set before triton is imported) on CPU tensors, which is
how the CPU tests run the kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from moetrain.models.kernel_switch import launch_device, switched_on

try:
    import triton
    import triton.language as tl
except ImportError:  # the eager formulas only
    triton = tl = None

ENV = "MOETRAIN_FUSED_SWIGLU"
"""Environment variable: ``0`` forces the eager formulas."""

BLOCK = 2048
"""Elements a program handles (8 bf16 a thread at 8 warps: one 16-byte load per operand)."""

NUM_WARPS = 8
"""Warps a program (a GPU tuning knob, like :data:`BLOCK`)."""

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
"""Dtypes :func:`silu_mul` and :func:`silu_mul_backward` send to the kernels (the kernels take fp32 too)."""


def enabled() -> bool:
    """False when ``MOETRAIN_FUSED_SWIGLU=0`` forces the eager formulas."""
    return switched_on(ENV)


def triton_importable() -> bool:
    return triton is not None


def kernel_applies(*tensors: torch.Tensor) -> bool:
    """The kernels take these operands: triton imports, the switch is on, and they are contiguous CUDA tensors of
    one shape, dtype (:data:`KERNEL_DTYPES`) and device."""
    first = tensors[0]
    return (triton is not None and enabled() and first.is_cuda and first.dtype in KERNEL_DTYPES
            and all(t.is_cuda and t.is_contiguous() and t.shape == first.shape and t.dtype == first.dtype
                    and t.device == first.device for t in tensors))


if triton is not None:

    @triton.jit
    def _silu_mul_fwd(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
        """h = silu(g) * u over ``n`` elements, ``BLOCK`` a program."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: n may pass 2**31
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-g))  # exp(-g) = inf for very negative g: s = 0, silu = -0, not NaN
        tl.store(h_ptr + offs, (g * s * u).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_bwd(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr, n, BLOCK: tl.constexpr, STORE_H: tl.constexpr):
        """dg = dh * u * silu'(g), du = dh * silu(g) and (``STORE_H``) h = silu(g) * u over ``n`` elements."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-g))
        silu = g * s
        tl.store(dg_ptr + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + offs, (dh * silu).to(du_ptr.dtype.element_ty), mask=mask)
        if STORE_H:
            tl.store(h_ptr + offs, (silu * u).to(h_ptr.dtype.element_ty), mask=mask)


def silu_mul_kernel(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h (N, I) = silu(g) * u by the Triton kernel, whatever the device (the CPU under ``TRITON_INTERPRET=1``);
    ``g``, ``u`` (N, I) contiguous, one dtype. :func:`silu_mul` chooses between this and the eager formula."""
    assert g.shape == u.shape and g.dtype == u.dtype and g.is_contiguous() and u.is_contiguous()
    h = torch.empty_like(g)
    n = g.numel()
    if n:
        with launch_device(g.device):
            _silu_mul_fwd[(triton.cdiv(n, BLOCK),)](g, u, h, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return h


def silu_mul_backward_kernel(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, *,
                             with_h: bool = True) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(dg, du, h) (N, I) each by the Triton kernel, whatever the device; ``h`` None unless ``with_h``. ``dh``,
    ``g``, ``u`` (N, I) contiguous, one dtype. :func:`silu_mul_backward` chooses between this and eager."""
    assert dh.shape == g.shape == u.shape and dh.dtype == g.dtype == u.dtype
    assert dh.is_contiguous() and g.is_contiguous() and u.is_contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    h = torch.empty_like(g) if with_h else None
    n = g.numel()
    if n:
        with launch_device(g.device):
            _silu_mul_bwd[(triton.cdiv(n, BLOCK),)](dh, g, u, dg, du, h if with_h else dg, n, BLOCK=BLOCK,
                                                    STORE_H=with_h, num_warps=NUM_WARPS)
    return dg, du, h


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h (N, I) = silu(g) * u of ``g``, ``u`` (N, I): the kernel where :func:`kernel_applies`, else eager."""
    if kernel_applies(g, u):
        return silu_mul_kernel(g, u)
    return F.silu(g) * u


def silu_mul_backward_eager(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, *,
                            with_h: bool = True) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The fallback: the ops autograd runs for ``F.silu(g) * u`` (``silu_backward`` is ``dy * s * (1 + g * (1 -
    s))`` in fp32 inside), in the operands' dtype. All (N, I).

    These are the eager path's bits, dtype for dtype, not an fp32 recomputation: the exactness tests hold paths that
    run them (the paged per-expert loop of :mod:`moetrain.offload.paged_experts`, a reference model) to the resident
    run's bits, and ``MOETRAIN_FUSED_SWIGLU=0`` is then the unfused baseline itself. In bf16 the kernel, which
    rounds each output once, is within an ulp or two of these (``dh * u`` and ``silu(g)`` are rounded here first)."""
    silu = F.silu(g)
    dg = torch.ops.aten.silu_backward(dh * u, g)
    du = dh * silu
    return dg, du, silu * u if with_h else None


def silu_mul_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, *,
                      with_h: bool = True) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(dg, du, h) (N, I) each of :func:`silu_mul` given ``dh`` (N, I), the gradient of its output, and its inputs
    ``g``, ``u`` (N, I): dg = dh * u * silu'(g), du = dh * silu(g), h = silu(g) * u (None unless ``with_h``). One
    kernel pass where :func:`kernel_applies`, else :func:`silu_mul_backward_eager`."""
    if kernel_applies(dh, g, u):
        return silu_mul_backward_kernel(dh, g, u, with_h=with_h)
    return silu_mul_backward_eager(dh, g, u, with_h=with_h)


class SiluMul(torch.autograd.Function):
    """h = silu(g) * u (N, I) under autograd, saving only ``g`` and ``u`` (eager autograd saves ``silu(g)`` too);
    the backward is one :func:`silu_mul_backward` pass that skips writing ``h`` (whoever consumes ``h`` saved it)."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return silu_mul(g, u)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        # autograd may hand a strided or expanded gradient: one copy keeps the single-pass kernel
        dg, du, _ = silu_mul_backward(dh.contiguous(), g, u, with_h=False)
        return dg, du


def swiglu_act(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u of ``g``, ``u`` (..., I) with :class:`SiluMul` (differentiable); the SwiGLU modules' activation."""
    return SiluMul.apply(g, u)
