"""The fused rotary embedding (moetrain.models.rope_kernel) compiled for CUDA, at Qwen3-30B-A3B's shapes (4 x 4 096
tokens, 32 query and 4 key heads of 128): bit for bit the eager formula and its autograd, forward and backward (as
``tests/models/test_rope_kernel.py`` checks under the interpreter); the dispatcher's choice; and an attention layer
under autocast (fp32 weights, a bf16 residual stream, as a fit runs it) with the kernels on and off
(``MOETRAIN_FUSED_ROPE=0``).

Run on the GPU machine: ``python -m pytest -q tests/gpu/test_rope_kernel_cuda.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from moetrain.config import ModelConfig
from moetrain.models import rope_kernel
from moetrain.models.attention import Attention, RotaryEmbedding, apply_rotary
from moetrain.models.varlen import document_spans

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
from test_rope_kernel import eager_forward_backward, graph_nodes, operands  # noqa: E402


@pytest.mark.parametrize("heads,dtype", [(32, torch.bfloat16), (4, torch.bfloat16), (4, torch.float16)])
def test_kernels_at_qwen3_shapes_are_the_eager_formula(heads, dtype):
    x, cos, sin, dy = (t.cuda() for t in operands(4, 4096, heads, 128, dtype=dtype))
    assert rope_kernel.kernel_applies(x, cos, sin)
    y = rope_kernel.rotary_kernel(x, cos, sin)
    dx = rope_kernel.rotary_backward_kernel(dy, cos, sin)
    y_ref, dx_ref = eager_forward_backward(x, cos, sin, dy)  # torch's CUDA ops and autograd
    assert torch.equal(y, y_ref), f"{int((y != y_ref).sum())} of {y.numel()} outputs differ"
    assert torch.equal(dx, dx_ref), f"{int((dx != dx_ref).sum())} of {dx.numel()} gradients differ"


def test_the_dispatcher_takes_the_kernels_for_bf16_with_the_switch_on(monkeypatch):
    x, cos, sin, dy = (t.cuda() for t in operands(2, 64, 4, 128))
    for flag, dtype, fused in (("1", torch.bfloat16, True), ("1", torch.float32, False), ("0", torch.bfloat16, False)):
        monkeypatch.setenv(rope_kernel.ENV, flag)
        y = apply_rotary(x.to(dtype).clone().requires_grad_(), cos.to(dtype), sin.to(dtype))
        assert ("_RotaryFnBackward" in graph_nodes(y)) == fused, (flag, dtype)


def qwen3_like() -> ModelConfig:
    return ModelConfig(family="qwen3_moe", vocab_size=512, hidden_size=2048, intermediate_size=512,
                       num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                       qk_norm="head", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128)


@pytest.mark.parametrize("packed", [False, True])
def test_an_attention_layer_under_autocast_with_and_without_the_kernels(monkeypatch, packed):
    """Causal attention through SDPA's math backend (deterministic: the gradients must be the same bits too), and
    packed documents through variable-length flash attention (the same output bits; its backward accumulates in an
    order of its own, so the gradients agree to bf16's precision)."""
    torch.manual_seed(0)
    attn = Attention(qwen3_like(), 0).cuda()
    b, seq = 2, 1024
    x = torch.randn(b, seq, 2048, device="cuda").bfloat16()
    pos = torch.arange(seq, device="cuda")[None].expand(b, -1)
    cos, sin = RotaryEmbedding(128, 1e6).cuda()(pos, torch.bfloat16)
    mask = document_spans(torch.arange(seq, device="cuda")[None].expand(b, -1) // 300) if packed else None
    dout = torch.randn(b, seq, 2048, device="cuda").bfloat16()
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv(rope_kernel.ENV, flag)
        xg = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.MATH):
            out = attn(xg, cos, sin, mask)
        assert ("_RotaryFnBackward" in graph_nodes(out)) == (flag == "1")
        grads = torch.autograd.grad(out, [xg, attn.q_proj.weight, attn.k_proj.weight, attn.q_norm.weight], dout)
        results.append((out.detach(), grads))
    (out_on, grads_on), (out_off, grads_off) = results
    assert torch.equal(out_on, out_off)
    for on, off in zip(grads_on, grads_off, strict=True):
        if packed:
            assert (on.float() - off.float()).abs().max() <= 1e-2 * off.float().abs().max()
        else:
            assert torch.equal(on, off)
