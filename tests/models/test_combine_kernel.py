"""The fused MoE combine (:mod:`moetrain.models.combine_kernel`): its eager path against the unfused ``combine`` of
``moetrain.models.experts``, and its Triton kernels against an fp64 reference under Triton's interpreter
(``TRITON_INTERPRET=1``; skipped without triton).

The interpreter must be on before triton is first imported, and other tests import triton first, so a normal
session runs the kernel tests of this module in a child pytest with ``TRITON_INTERPRET=1``
(:func:`test_kernels_under_the_interpreter`), where they run in-process (as ``tests/offload/test_fused_step.py``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch

from moetrain.models import combine_kernel, kernel_switch
from moetrain.models.combine_kernel import combine_rows
from moetrain.models.experts import combine, dispatch
from moetrain.models.router import Routing

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
BF16_STEP = 2.0 ** -7  # bf16's relative spacing: one rounding (or the interpreter's truncation) is within it


@pytest.fixture(scope="module")
def kernels():
    """The kernels' module, interpreted (in the child session only: see the module's docstring)."""
    if not INTERPRETING:
        pytest.skip("runs in the child session under TRITON_INTERPRET=1 (test_kernels_under_the_interpreter)")
    pytest.importorskip("triton")
    return importlib.import_module(combine_kernel.KERNELS)


def test_kernels_under_the_interpreter(run_interpreted):
    """This module's kernel tests, in a child pytest that turns the interpreter on before importing triton."""
    run_interpreted(__file__, select="interpreted", timeout=300)


def _routing(tokens: int, experts: int, k: int, seed: int, weight_dtype=torch.float32) -> Routing:
    """Random distinct top-k experts a token, random weights."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(tokens, experts, generator=g).topk(k, dim=1).indices  # (T, k) distinct
    weight = torch.rand(tokens, k, generator=g).to(weight_dtype)
    return Routing(topk_idx=idx, topk_weight=weight, counts=torch.bincount(idx.reshape(-1), minlength=experts),
                   logits=torch.zeros(tokens, experts), aux_loss=torch.zeros(()))


def _inputs(tokens: int, k: int, hidden: int, *, dtype, weight_dtype=torch.float32, seed: int = 0):
    """(y (N, H) leaf, weight (T, k) leaf, dout (T, H) fp32, the Dispatch) of a random routing over 7 experts."""
    d = dispatch(_routing(tokens, 7, k, seed, weight_dtype))
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randn(tokens * k, hidden, generator=g).to(dtype).requires_grad_()
    weight = d.token_weight.clone().requires_grad_()
    d.token_weight = weight
    dout = torch.randn(tokens, hidden, generator=g)
    return y, weight, dout, d


@pytest.mark.parametrize("dtype, out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16)])
def test_eager_path_equals_the_unfused_combine(dtype, out_dtype):
    """Forward and both gradients of the eager path are the unfused combine's, to fp32 rounding (the same
    products, in y's dtype; only reduction orders may differ)."""
    y, weight, dout, d = _inputs(23, 4, 24, dtype=dtype)
    ref = combine(y, d, out_dtype)
    ref_dy, ref_dw = torch.autograd.grad(ref, (y, weight), dout.to(out_dtype))
    out = combine_rows(y, d.inverse, weight, out_dtype=out_dtype, fused=False)
    dy, dw = torch.autograd.grad(out, (y, weight), dout.to(out_dtype))
    assert out.dtype == out_dtype and dy.dtype == dtype and dw.dtype == weight.dtype
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dy, ref_dy, rtol=0, atol=0)  # a permutation of the same products
    torch.testing.assert_close(dw, ref_dw, rtol=1e-6, atol=1e-6)


def test_eager_path_without_weight_gradient():
    """Weights that need no gradient get none, and y's is unchanged."""
    y, weight, dout, d = _inputs(11, 3, 16, dtype=torch.float32)
    frozen = weight.detach()
    out = combine_rows(y, d.inverse, frozen, out_dtype=torch.float32, fused=False)
    (dy,) = torch.autograd.grad(out, (y,), dout)
    d.token_weight = frozen
    (ref_dy,) = torch.autograd.grad(combine(y, d, torch.float32), (y,), dout)
    torch.testing.assert_close(dy, ref_dy, rtol=0, atol=0)


def test_availability(monkeypatch):
    """The kernels run on CUDA tensors only, and ``MOETRAIN_FUSED_COMBINE=0`` switches them off."""
    assert not combine_kernel.fused_available(torch.zeros(2, 2))
    monkeypatch.setenv(combine_kernel.ENV, "0")
    assert not combine_kernel.enabled()
    monkeypatch.setenv(combine_kernel.ENV, "1")
    assert combine_kernel.enabled()


def test_module_imports_without_triton(monkeypatch, request):
    """A fresh copy of the module loads with triton unimportable, and reports the kernels unavailable."""
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    kernel_switch.triton_importable.cache_clear()  # asked again: the answer is cached per process
    request.addfinalizer(kernel_switch.triton_importable.cache_clear)
    spec = importlib.util.spec_from_file_location("combine_kernel_copy", combine_kernel.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.triton_importable()


def _reference(y, weight, dout, inverse):
    """(out, dy, dweight) in fp64 from the same inputs."""
    tokens, k = weight.shape
    rows = y.detach().double().index_select(0, inverse).view(tokens, k, -1)  # (T, k, H)
    w, g = weight.detach().double(), dout.double()
    out = (rows * w.unsqueeze(-1)).sum(1)
    terms = (w.unsqueeze(-1) * g.unsqueeze(1)).reshape(tokens * k, -1)
    dy = torch.empty_like(terms).index_copy_(0, inverse, terms)
    dweight = (rows * g.unsqueeze(1)).sum(-1)
    scale = (rows.abs() * g.unsqueeze(1).abs()).sum(-1)  # what dweight's fp32 rounding is relative to
    return out, dy, dweight, scale


def _assert_rounded(got: torch.Tensor, exact: torch.Tensor) -> None:
    """``got`` is ``exact`` rounded once to its dtype (within fp32 arithmetic before it)."""
    step = BF16_STEP if got.dtype == torch.bfloat16 else 1e-6
    err = (got.double() - exact).abs()
    assert (err <= step * exact.abs() + 1e-6).all(), float(err.max())


@pytest.mark.parametrize("hidden, block", [(40, None), (40, 16)])  # one masked tile; three, the last partial
@pytest.mark.parametrize("dtype, out_dtype, weight_dtype", [
    (torch.bfloat16, torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float32, torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16, torch.bfloat16)])
def test_interpreted_kernels_equal_fp64_reference(kernels, monkeypatch, hidden, block, dtype, out_dtype,
                                                  weight_dtype):
    """Forward, dy and dweight of the kernels: fp32 arithmetic rounded once into each output's dtype."""
    if block is not None:
        monkeypatch.setattr(combine_kernel, "MAX_BLOCK", block)
    y, weight, dout, d = _inputs(19, 3, hidden, dtype=dtype, weight_dtype=weight_dtype, seed=3)
    out = combine_rows(y, d.inverse, weight, out_dtype=out_dtype, fused=True)
    dy, dw = torch.autograd.grad(out, (y, weight), dout.to(out_dtype))
    ref_out, ref_dy, ref_dw, scale = _reference(y, weight, dout.to(out_dtype), d.inverse)
    assert out.dtype == out_dtype and dy.dtype == dtype and dw.dtype == weight_dtype
    _assert_rounded(out, ref_out)
    _assert_rounded(dy, ref_dy)
    step = BF16_STEP if weight_dtype == torch.bfloat16 else 1e-5
    assert ((dw.double() - ref_dw).abs() <= step * scale + 1e-6).all()


def test_interpreted_gradients_of_one_input(kernels):
    """Only y's gradient (frozen weights), then only the weights' (y needs none): each equals the reference."""
    y, weight, dout, d = _inputs(19, 3, 40, dtype=torch.bfloat16, seed=5)
    _, ref_dy, ref_dw, scale = _reference(y, weight, dout, d.inverse)
    out = combine_rows(y, d.inverse, weight.detach(), out_dtype=torch.float32, fused=True)
    (dy,) = torch.autograd.grad(out, (y,), dout)
    _assert_rounded(dy, ref_dy)
    out = combine_rows(y.detach(), d.inverse, weight, out_dtype=torch.float32, fused=True)
    (dw,) = torch.autograd.grad(out, (weight,), dout)
    assert ((dw.double() - ref_dw).abs() <= 1e-5 * scale + 1e-6).all()
