"""The fused RMSNorm (moetrain.models.rmsnorm_kernel): the eager path keeps the Hugging Face formula's bits, and the
Triton kernels, run on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``; skipped without triton), match
an fp64 reference of the same formula from the same rounded inputs, forward and backward.

Tolerances: ``y`` and ``dx`` are computed in fp32 and rounded once to bf16, within an ulp of the exact value (the
interpreter's fp32 -> bf16 cast truncates); ``y`` rounds the normalized value before the weight multiply, as the
formula does, so two roundings: two ulps (2**-6 relative in bf16). ``dx = rstd * (g - n * mean(g * n))`` cancels
where ``g`` is nearly parallel to ``n``, so it also gets an absolute floor of a few fp32 ulps of its largest value
times the row length. ``dw`` sums ``dy * round(n)`` over rows: each term within an ulp of the reference's.

The interpreter must be on before triton is first imported, so a normal session runs the kernel tests of this module
in a child pytest (:func:`test_kernels_under_the_interpreter`), as ``tests/models/test_swiglu_kernel.py`` does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetrain.models import rmsnorm_kernel
from moetrain.models.attention import RMSNorm
from moetrain.models.rmsnorm_kernel import rms_norm_eager

EPS = 1e-6


def test_kernels_under_the_interpreter(run_interpreted):
    """This module's kernel tests, in a child pytest that turns the interpreter on before importing triton."""
    run_interpreted(__file__, select="interpreted")


def written_out(x: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The Hugging Face families' RMSNorm as they write it (Qwen3MoeRMSNorm, LlamaRMSNorm), with this project's
    autocast rule for the weight (cast to the input's dtype, so a bf16 residual stream stays bf16)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype != dtype and torch.is_autocast_enabled(x.device.type):
        weight = weight.to(dtype)
    return weight * h.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_module_off_cuda_is_the_written_out_formula(dtype):
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=gen) + 0.5)
    x = (torch.randn(5, 7, 64, generator=gen) * 3).to(dtype)
    assert torch.allclose(norm(x), written_out(x, norm.weight), rtol=0, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
        assert out.dtype == dtype and torch.equal(out, rms_norm_eager(x, norm.weight, norm.eps))


def operands(m: int, d: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x (m, d) bf16, weight (d,) fp32, dy (m, d) bf16); rows of very different scales. The weight's values are
    bf16 values, so that its cast (rounded on the GPU, truncated by the interpreter) is exact either way."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=gen) * torch.logspace(-2, 2, m).unsqueeze(1)
    weight = (torch.rand(d, generator=gen) + 0.5).bfloat16().float()
    dy = torch.randn(m, d, generator=gen)
    return x.bfloat16(), weight, dy.bfloat16()


def reference(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor):
    """(y, rstd, dx, dw) in fp64 from the rounded inputs: y = round(w) * round(n) (n rounded to bf16, as the formula
    does), dx and dw the derivatives of w_r * n (the rounding of n has no derivative)."""
    x64, w64, dy64 = x.double(), weight.bfloat16().double(), dy.double()
    rstd = torch.rsqrt(x64.pow(2).mean(-1) + EPS)
    n = x64 * rstd[:, None]
    y = w64 * n.bfloat16().double()
    g = dy64 * w64
    dx = rstd[:, None] * (g - n * (g * n).mean(-1, keepdim=True))
    dw = (dy64 * n.bfloat16().double()).sum(0)
    return y, rstd, dx, dw


def assert_close_bf16(actual: torch.Tensor, exact: torch.Tensor, *, ulps: float = 2.0, floor: float = 0.0) -> None:
    err = (actual.double() - exact).abs()
    bound = ulps * 2.0 ** -7 * exact.abs() + floor * exact.abs().max()
    assert bool((err <= bound).all()), f"worst excess {float((err - bound).max()):.3g}"


# rows of 128 (32 a program, the last partial), 100 (padded to 128, masked), 2 048 (two a program), 5 000 (one)
@pytest.mark.parametrize("m,d", [(70, 128), (9, 100), (5, 2048), (3, 5000)])
def test_kernels_match_the_reference_interpreted(interpreted, m, d):
    x, weight, dy = operands(m, d)
    y, rstd = rmsnorm_kernel.rms_norm_kernel(x, weight, EPS)
    dx, dw = rmsnorm_kernel.rms_norm_backward_kernel(dy, x, weight, rstd=rstd)
    y_ref, rstd_ref, dx_ref, dw_ref = reference(x, weight, dy)
    assert y.dtype == dx.dtype == torch.bfloat16 and rstd.dtype == dw.dtype == torch.float32
    assert torch.allclose(rstd.double(), rstd_ref, rtol=1e-6, atol=0)
    assert_close_bf16(y, y_ref)
    assert_close_bf16(dx, dx_ref, ulps=1.0, floor=d * 2.0 ** -22)
    # each term's round(n) may differ by an ulp (2**-7 of it) between the kernel and the reference
    n_abs = (x.double() * rstd_ref[:, None]).abs()
    assert bool(((dw.double() - dw_ref).abs() <= 2.0 ** -7 * (dy.double().abs() * n_abs).sum(0) + 1e-6).all())


def test_the_autograd_function_returns_each_gradient_interpreted(interpreted):
    """Through autograd (as RMSNorm runs it on CUDA): the output and both gradients are the kernels' own, for input
    of any leading shape; the weight's gradient comes back in the weight's dtype."""
    x, weight, dy = operands(4 * 6, 128, seed=1)
    x3 = x.view(4, 6, 128).requires_grad_()
    w = weight.clone().requires_grad_()
    y = rmsnorm_kernel._RMSNormFn.apply(x3, w, EPS)
    y.backward(dy.view(4, 6, 128))
    y_k, rstd = rmsnorm_kernel.rms_norm_kernel(x, weight, EPS)
    dx_k, dw_k = rmsnorm_kernel.rms_norm_backward_kernel(dy, x, weight, rstd=rstd)
    assert y.shape == (4, 6, 128) and torch.equal(y.detach().view(-1, 128), y_k)
    assert torch.equal(x3.grad.view(-1, 128), dx_k) and w.grad.dtype == torch.float32 and torch.equal(w.grad, dw_k)


def test_off_cuda_the_kernel_does_not_apply():
    x, weight, _ = operands(4, 128)
    assert not rmsnorm_kernel.kernel_applies(x, weight)  # CPU tensors: the eager formula
    # the eager formula is F.rms_norm on an fp32 copy, then the weight
    assert torch.equal(rms_norm_eager(x, weight, EPS), weight * F.rms_norm(x.float(), (128,), eps=EPS).bfloat16())
