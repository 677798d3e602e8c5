"""The fused SwiGLU activation (moetrain.models.swiglu_kernel): the eager path against torch's autograd of
``F.silu(g) * u``, the Triton kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``; skipped
without triton), and the grouped experts, which use both, against the per-expert loop.

Tolerances come from the outputs' rounding: each kernel output is computed in fp32 and rounded once, so it lies
within one unit in the last place of its dtype (:func:`assert_within_ulp`) of the exact value; one, not half,
because the interpreter's fp32 -> bf16 cast truncates where the GPU's rounds to nearest. The eager path is
autograd's own ops in the operands' dtype (two roundings in bf16: two ulps). An absolute floor of a few fp32 ulps of
the largest value covers the fp32 arithmetic itself (``1 + g * (1 - s)`` cancels near g = -1.28).

The interpreter must be on before triton is first imported, and other tests import triton first, so a normal
session runs the kernel tests of this module in a child pytest with ``TRITON_INTERPRET=1``
(:func:`test_kernels_under_the_interpreter`), where they run in-process (the same scheme as
``tests/offload/test_fused_step.py``).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

from moetrain.models import swiglu_kernel
from moetrain.models.experts import RoutedExperts
from moetrain.models.router import Routing
from moetrain.models.swiglu_kernel import SiluMul, silu_mul, silu_mul_backward, swiglu_act

# the interpreter's numpy exp overflows to inf for g <= -89 on purpose (operands): s = 0, as on the GPU
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

MANTISSA = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}  # significand bits, the implicit one too
SHAPE = (37, 100)  # 3700 elements: one full program of swiglu_kernel.BLOCK (2048) and a partial one


def test_kernels_under_the_interpreter(run_interpreted):
    """This module's kernel tests, in a child pytest that turns the interpreter on before importing triton."""
    run_interpreted(__file__, select="interpreted")


def operands(shape, dtype, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, g, u) of ``shape`` in ``dtype``; ``g`` spans the sigmoid's saturation (|g| up to ~12) and a few
    extreme values where exp(-g) overflows fp32, which must give silu = 0, not NaN."""
    gen = torch.Generator().manual_seed(seed)
    dh, g, u = (torch.randn(shape, generator=gen) for _ in range(3))
    g = g * 3
    g.view(-1)[:4] = torch.tensor([-100.0, 100.0, -40.0, 40.0])
    return dh.to(dtype), g.to(dtype), u.to(dtype)


def reference(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dg, du, h) in fp64 by torch's autograd of F.silu(g) * u, from the (rounded) inputs."""
    g64, u64 = g.double().requires_grad_(), u.double().requires_grad_()
    h = F.silu(g64) * u64
    dg, du = torch.autograd.grad(h, (g64, u64), dh.double())
    return dg, du, h.detach()


def assert_within_ulp(actual: torch.Tensor, exact: torch.Tensor, ulps: float = 1.0) -> None:
    """``actual`` (any float dtype) within ``ulps`` units in its dtype's last place of ``exact`` (fp64), plus an
    absolute floor of 4 fp32 ulps of ``exact``'s largest magnitude (the fp32 arithmetic before the rounding)."""
    assert actual.shape == exact.shape
    _, exponent = torch.frexp(exact)  # exact = m * 2**e, 0.5 <= |m| < 1: an ulp is 2**(e - significand bits)
    ulp = torch.ldexp(torch.ones_like(exact), exponent - MANTISSA[actual.dtype])
    floor = 4 * 2.0 ** -24 * exact.abs().max()
    err = (actual.double() - exact).abs()
    bad = err > ulps * ulp + floor
    assert not bad.any(), f"{int(bad.sum())} elements off, worst {float((err / (ulp + floor)).max()):.3g} ulp"


# ----- the eager path (CPU tensors: always eager outside the interpreter's child session)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_forward_backward_equal_autograd(dtype):
    dh, g, u = operands(SHAPE, dtype)
    dg_ref, du_ref, h_ref = reference(dh, g, u)
    gi, ui = g.clone().requires_grad_(), u.clone().requires_grad_()
    h = swiglu_act(gi, ui)
    h.backward(dh)
    assert h.dtype == gi.grad.dtype == ui.grad.dtype == dtype
    # autograd's ops in the inputs' dtype: silu(g) (or dh * u) is rounded before the last op rounds again
    ulps = 1.0 if dtype == torch.float32 else 2.0
    for actual, exact in ((h.detach(), h_ref), (gi.grad, dg_ref), (ui.grad, du_ref)):
        assert_within_ulp(actual, exact, ulps)
    dg, du, h_bwd = silu_mul_backward(dh, g, u)  # the grouped experts' entry: h comes with the gradients
    torch.testing.assert_close(dg, gi.grad, rtol=0, atol=0)
    torch.testing.assert_close(du, ui.grad, rtol=0, atol=0)
    assert silu_mul_backward(dh, g, u, with_h=False)[2] is None
    # autograd's own ops, bit for bit: paths that run those (the paged loop, reference models) must still match
    ga, ua = g.clone().requires_grad_(), u.clone().requires_grad_()
    ha = F.silu(ga) * ua
    ha.backward(dh)
    torch.testing.assert_close((h, gi.grad, ui.grad, h_bwd), (ha, ga.grad, ua.grad, ha), rtol=0, atol=0)


def test_eager_gradcheck_fp64():
    g = (torch.randn(5, 7, dtype=torch.float64) * 3).requires_grad_()
    u = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiluMul.apply, (g, u))


def test_autograd_saves_only_the_inputs():
    """SiluMul keeps g and u for backward (eager autograd also keeps silu(g))."""
    g = torch.randn(*SHAPE, requires_grad=True)
    u = torch.randn(*SHAPE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu_act(g, u)
    assert len(saved) == 2 and saved[0] is g and saved[1] is u


def test_kernel_only_for_cuda_and_not_when_switched_off(monkeypatch):
    g = torch.randn(*SHAPE)
    assert not swiglu_kernel.kernel_applies(g, g)  # CPU tensors: eager
    monkeypatch.setenv(swiglu_kernel.ENV, "0")
    assert not swiglu_kernel.enabled()
    monkeypatch.setenv(swiglu_kernel.ENV, "1")
    assert swiglu_kernel.enabled()


def test_module_imports_without_triton(monkeypatch):
    """Without triton the module still imports and computes (eagerly)."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes ``import triton`` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("swiglu_kernel_without_triton", swiglu_kernel.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.triton_importable()
    dh, g, u = operands(SHAPE, torch.float32)
    torch.testing.assert_close(module.silu_mul(g, u), silu_mul(g, u))
    assert not module.kernel_applies(g, u)


# ----- the kernels, interpreted (child session)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [SHAPE, (3, 5), (1, 2049)])
def test_interpreted_kernels_equal_fp64_reference(interpreted, dtype, shape):
    dh, g, u = operands(shape, dtype, seed=sum(shape))
    dg_ref, du_ref, h_ref = reference(dh, g, u)
    h = swiglu_kernel.silu_mul_kernel(g, u)
    dg, du, h_bwd = swiglu_kernel.silu_mul_backward_kernel(dh, g, u)
    assert h.dtype == dg.dtype == du.dtype == h_bwd.dtype == dtype
    for actual, exact in ((h, h_ref), (dg, dg_ref), (du, du_ref), (h_bwd, h_ref)):
        assert torch.isfinite(actual).all()
        assert_within_ulp(actual, exact)
    torch.testing.assert_close(h_bwd, h, rtol=0, atol=0)  # the same fp32 formula: the same bits


def test_interpreted_kernel_equals_eager_backward(interpreted):
    """The kernel and the eager fallback agree to a few ulps: the interpreted kernel within one of the exact value
    (truncation), eager bf16 within two (two roundings)."""
    dh, g, u = operands(SHAPE, torch.bfloat16, seed=3)
    kernel = swiglu_kernel.silu_mul_backward_kernel(dh, g, u)
    eager = swiglu_kernel.silu_mul_backward_eager(dh, g, u)
    for k, e in zip(kernel, eager, strict=True):
        assert_within_ulp(k, e.double(), ulps=3.0)
    dg, du, h = swiglu_kernel.silu_mul_backward_kernel(dh, g, u, with_h=False)
    assert h is None
    torch.testing.assert_close((dg, du), kernel[:2], rtol=0, atol=0)


def test_interpreted_empty(interpreted):
    g = torch.empty(0, 8, dtype=torch.bfloat16)
    assert swiglu_kernel.silu_mul_kernel(g, g).shape == (0, 8)
    assert all(t.shape == (0, 8) for t in swiglu_kernel.silu_mul_backward_kernel(g, g, g))


# ----- the grouped experts (eager on the CPU) against the per-expert loop


def _routing(tokens: int, experts: int, k: int) -> Routing:
    idx = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])
    counts = torch.bincount(idx.reshape(-1), minlength=experts)
    return Routing(topk_idx=idx, topk_weight=torch.rand(tokens, k), counts=counts,
                   logits=torch.zeros(tokens, experts), aux_loss=torch.zeros(()))


def _run(experts: RoutedExperts, x: torch.Tensor, routing: Routing, impl: str):
    experts.impl = impl
    experts.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    out = experts(xi, routing)
    out.backward(torch.ones_like(out) * torch.linspace(-1, 1, out.shape[-1]))
    grads = {n: p.grad.clone() for n, p in experts.named_parameters() if p.grad is not None}
    return out.detach(), xi.grad, grads


@pytest.mark.parametrize("frozen", [False, True])
def test_grouped_experts_equal_loop(frozen):
    """The grouped path (silu_mul forward, silu_mul_backward's h for the down projection's weight gradient) against
    the per-expert loop (SwiGLU modules through swiglu_act); frozen: no weight gradients, h not written."""
    experts = RoutedExperts(6, 16, 24, impl="grouped")
    for p in experts.parameters():
        p.data.normal_(0, 0.3)
        p.requires_grad_(not frozen)
    x = torch.randn(20, 16)
    routing = _routing(20, 6, 2)
    y_loop, dx_loop, g_loop = _run(experts, x, routing, "loop")
    y_grp, dx_grp, g_grp = _run(experts, x, routing, "grouped")
    torch.testing.assert_close(y_grp, y_loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_grp, dx_loop, rtol=1e-5, atol=1e-6)
    assert (not g_loop) == frozen
    for name, ref in g_loop.items():
        torch.testing.assert_close(g_grp[name], ref, rtol=1e-5, atol=1e-6)
