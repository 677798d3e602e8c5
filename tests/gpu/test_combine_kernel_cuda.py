"""The fused MoE combine compiled for CUDA at DeepSeek-MoE-16B's shape (T = 8192 tokens, k = 6 of 64 experts,
H = 2048, bf16 expert outputs): forward, dy and dweight against the eager path (the unfused formulas, products
in bf16) and against an fp32 reference of the same inputs, and bit for bit run to run.

Run on the GPU machine: ``python -m pytest -q tests/gpu/test_combine_kernel_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from moetrain.models import combine_kernel
from moetrain.models.combine_kernel import combine_rows
from moetrain.models.experts import dispatch
from moetrain.models.router import Routing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

T, K, E, H = 8192, 6, 64, 2048


def _inputs(seed: int = 0):
    """(y (N, H) bf16 leaf, weight (T, k) fp32 leaf, dout (T, H) fp32, inverse (N,)) of a random routing."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.rand(T, E, generator=g, device="cuda").topk(K, dim=1).indices  # k distinct experts a token
    weight = torch.rand(T, K, generator=g, device="cuda").softmax(-1)
    routing = Routing(topk_idx=idx, topk_weight=weight, counts=torch.bincount(idx.reshape(-1), minlength=E),
                      logits=torch.zeros(T, E, device="cuda"), aux_loss=torch.zeros((), device="cuda"))
    d = dispatch(routing)
    y = torch.randn(T * K, H, generator=g, device="cuda").bfloat16().requires_grad_()
    dout = torch.randn(T, H, generator=g, device="cuda")
    return y, weight.clone().requires_grad_(), dout, d.inverse


def _run(y, weight, dout, inverse, *, out_dtype, fused):
    out = combine_rows(y, inverse, weight, out_dtype=out_dtype, fused=fused)
    dy, dw = torch.autograd.grad(out, (y, weight), dout.to(out_dtype))
    return out, dy, dw


def test_the_kernels_run_by_default_on_cuda(monkeypatch):
    y = torch.zeros(4, 8, device="cuda")
    assert combine_kernel.fused_available(y)
    monkeypatch.setenv(combine_kernel.ENV, "0")
    assert not combine_kernel.fused_available(y)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_kernels_equal_the_eager_path(out_dtype):
    """Within bf16 rounding of the eager path (its products are rounded to bf16, the kernels' are fp32), and
    within one rounding of an fp32 reference of the same inputs."""
    y, weight, dout, inverse = _inputs()
    out, dy, dw = _run(y, weight, dout, inverse, out_dtype=out_dtype, fused=True)
    e_out, e_dy, e_dw = _run(y, weight, dout, inverse, out_dtype=out_dtype, fused=False)
    assert out.dtype == out_dtype and dy.dtype == torch.bfloat16 and dw.dtype == torch.float32

    rows = y.detach().float().index_select(0, inverse).view(T, K, H)
    g = dout.to(out_dtype).float()
    ref_out = (rows * weight.detach().unsqueeze(-1)).sum(1)
    ref_dy = torch.empty(T * K, H, device="cuda").index_copy_(
        0, inverse, (weight.detach().unsqueeze(-1) * g.unsqueeze(1)).view(T * K, H))
    ref_dw = (rows * g.unsqueeze(1)).sum(-1)
    scale_dw = (rows.abs() * g.unsqueeze(1).abs()).sum(-1)

    step = 2.0 ** -8 if out_dtype == torch.bfloat16 else 1e-6  # round to nearest: half a bf16 step
    assert ((out.float() - ref_out).abs() <= step * ref_out.abs() + 1e-6).all()
    assert ((dy.float() - ref_dy).abs() <= 2.0 ** -8 * ref_dy.abs() + 1e-30).all()
    assert ((dw - ref_dw).abs() <= 1e-5 * scale_dw).all()

    # against the eager path: bf16 products (k of them summed, H of them for dweight) and one more rounding
    torch.testing.assert_close(out.float(), e_out.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dy.float(), e_dy.float(), rtol=2e-2, atol=1e-3)
    assert ((dw - e_dw).abs() <= 2e-2 * scale_dw).all()


def test_kernels_are_deterministic():
    """Bit for bit the same results run to run (a fixed summation order, no atomics)."""
    y, weight, dout, inverse = _inputs(seed=1)
    first = _run(y, weight, dout, inverse, out_dtype=torch.bfloat16, fused=True)
    second = _run(y, weight, dout, inverse, out_dtype=torch.bfloat16, fused=True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_broadcast_gradient_and_frozen_weights():
    """An expanded output gradient (``out.sum()``: stride 0) and weights that need no gradient."""
    y, weight, _, inverse = _inputs(seed=2)
    out = combine_rows(y, inverse, weight.detach(), out_dtype=torch.float32, fused=True)
    (dy,) = torch.autograd.grad(out.sum(), (y,))
    expected = weight.detach().reshape(-1)[torch.argsort(inverse)]  # the weight of each sorted row
    torch.testing.assert_close(dy.float(), expected.bfloat16().float().unsqueeze(1).expand(-1, H), rtol=0, atol=0)
