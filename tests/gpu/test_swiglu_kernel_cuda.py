"""The fused SwiGLU kernels (moetrain.models.swiglu_kernel) compiled for CUDA, at the activations' real shapes: the
routed experts' (49152 x 1408 bf16: 4096 tokens x top-6 x DeepSeek-MoE-16B's expert width) and the shared experts'
(8192 x 2816), against the fp64 reference of the same rounded inputs, forward and backward; and the grouped experts
layer with the kernels on and off (``MOETRAIN_FUSED_SWIGLU=0``).

Each kernel output is computed in fp32 and rounded to nearest once, so it is within one bf16 ulp of the exact value
(half an ulp plus the GPU's approximate exp and division); see ``tests/models/test_swiglu_kernel.py``, whose
:func:`assert_within_ulp` this uses.

Run on the GPU machine: ``python -m pytest -q tests/gpu/test_swiglu_kernel_cuda.py``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from moetrain.models import swiglu_kernel
from moetrain.models.experts import RoutedExperts, grouped_mm_available
from moetrain.models.router import Routing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
from test_swiglu_kernel import assert_within_ulp  # noqa: E402


def _operands(shape, *, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dh, g, u = (torch.randn(shape, device="cuda", generator=gen) for _ in range(3))
    g = g * 3
    g.view(-1)[:4] = torch.tensor([-100.0, 100.0, -40.0, 40.0], device="cuda")  # exp(-g) overflows: silu = 0
    return dh.bfloat16(), g.bfloat16(), u.bfloat16()


def _reference(dh, g, u):
    """(dg, du, h) in fp64 from the bf16 inputs (silu_backward's formula, one product at a time)."""
    dh, g, u = dh.double(), g.double(), u.double()
    s = torch.sigmoid(g)
    return dh * u * s * (1 + g * (1 - s)), dh * g * s, g * s * u


@pytest.mark.parametrize("shape", [(49152, 1408), (8192, 2816)], ids=["routed", "shared"])
def test_kernels_equal_reference_at_real_shapes(shape, monkeypatch):
    monkeypatch.delenv(swiglu_kernel.ENV, raising=False)
    if not swiglu_kernel.triton_importable():
        pytest.skip("needs triton")
    dh, g, u = _operands(shape)
    assert swiglu_kernel.kernel_applies(dh, g, u)
    assert not swiglu_kernel.kernel_applies(g[:8].float(), u[:8].float())  # fp32 keeps autograd's own ops
    h = swiglu_kernel.silu_mul(g, u)
    dg, du, h_bwd = swiglu_kernel.silu_mul_backward(dh, g, u)
    exact = _reference(dh, g, u)
    # one output at a time: fp64 copies of 49152 x 1408 are 550 MB each
    for actual, ref in zip((dg, du, h_bwd), exact, strict=True):
        assert torch.isfinite(actual).all()
        assert_within_ulp(actual, ref)
    assert_within_ulp(h, exact[2])
    torch.testing.assert_close(h_bwd, h, rtol=0, atol=0)
    # the eager fallback (autograd's bf16 ops: two roundings, within 1.5 ulps) agrees with the kernel to 2 ulps
    monkeypatch.setenv(swiglu_kernel.ENV, "0")
    assert not swiglu_kernel.kernel_applies(dh, g, u)
    for k, e in zip((dg, du, h_bwd), swiglu_kernel.silu_mul_backward(dh, g, u), strict=True):
        assert_within_ulp(k, e.double(), ulps=2.0)


def test_swiglu_act_backward_under_autograd():
    """SiluMul: the kernel forward and backward (h not written), against autograd's own F.silu(g) * u in fp64."""
    dh, g, u = _operands((8192, 2816), seed=1)
    gi, ui = g.clone().requires_grad_(), u.clone().requires_grad_()
    swiglu_kernel.swiglu_act(gi, ui).backward(dh)
    dg_ref, du_ref, _ = _reference(dh, g, u)
    assert_within_ulp(gi.grad, dg_ref)
    assert_within_ulp(ui.grad, du_ref)


def _routing(tokens: int, experts: int, k: int) -> Routing:
    gen = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.rand(tokens, experts, device="cuda", generator=gen)
    weight, idx = scores.topk(k, dim=-1)
    counts = torch.bincount(idx.reshape(-1), minlength=experts)
    return Routing(topk_idx=idx, topk_weight=weight, counts=counts, logits=scores, aux_loss=torch.zeros((),
                                                                                                      device="cuda"))


def _run(experts: RoutedExperts, x: torch.Tensor, routing: Routing, grad: torch.Tensor):
    experts.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    out = experts(xi, routing)
    out.backward(grad)
    grads = {n: p.grad.float().clone() for n, p in experts.named_parameters() if p.grad is not None}
    return out.detach().float(), xi.grad.float(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_grouped_experts_fused_equal_unfused(monkeypatch):
    """The grouped experts layer (64 experts, 2048 -> 1408, 4096 tokens top-6: N = 24576 rows) in bf16 with the
    kernels on and off: the same GEMMs around activations that differ by bf16 rounding, so outputs and gradients
    differ by a bf16 ulp or two (norm-wise), and the fused path (h rounded once, not silu(g) then the product) is at
    least as close as the eager one to the fp32 loop over the same bf16 weights."""
    torch.manual_seed(0)
    experts = RoutedExperts(64, 2048, 1408, impl="grouped").cuda().bfloat16()
    for p in experts.parameters():
        p.data.normal_(0, 0.02)
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    if not grouped_mm_available(x, 2048, 1408):
        pytest.skip("needs torch._grouped_mm on sm90+")
    routing = _routing(4096, 64, 6)
    grad = torch.randn_like(x)
    monkeypatch.setenv(swiglu_kernel.ENV, "0")
    off = _run(experts, x, routing, grad)
    monkeypatch.setenv(swiglu_kernel.ENV, "1")
    on = _run(experts, x, routing, grad)
    reference = copy.deepcopy(experts).float()
    reference.impl = "loop"
    ref = _run(reference, x.float(), routing, grad.float())
    assert on[2].keys() == off[2].keys() == ref[2].keys() and len(on[2]) == 3 * 64
    names = sorted(ref[2])
    for what, a, b, r in [("y", on[0], off[0], ref[0]), ("dx", on[1], off[1], ref[1])] + \
            [(n, on[2][n], off[2][n], ref[2][n]) for n in names]:
        assert _rel(a, b) <= 1e-2, (what, _rel(a, b))  # a bf16 ulp is 2**-8 to 2**-7 relative
        assert _rel(a, r) <= 1.25 * _rel(b, r) + 1e-4, (what, _rel(a, r), _rel(b, r))
