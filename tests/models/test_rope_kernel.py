"""The fused rotary embedding (moetrain.models.rope_kernel): the Triton kernels, run on the CPU through Triton's
interpreter (``TRITON_INTERPRET=1``; skipped without triton), are the eager formula ``x * cos + rotate_half(x) * sin``
bit for bit in bf16 and fp16, forward and backward (against torch's autograd of the formula), on sizes that fill no
block evenly; the dispatcher takes the kernels for bf16/fp16 only and not with ``MOETRAIN_FUSED_ROPE=0``; an attention
layer's output and gradients are the same bits with the kernels and without. Off the interpreter (the CPU as the
project runs on it) the dispatcher is the eager formula.

The interpreter must be on before triton is first imported, so a normal session runs the kernel tests of this module
in a child pytest (:func:`test_kernels_under_the_interpreter`), as ``tests/models/test_rmsnorm_kernel.py`` does.
"""

from __future__ import annotations

import os

import pytest
import torch

from moetrain.config import ModelConfig
from moetrain.models import rope_kernel
from moetrain.models.attention import Attention, RotaryEmbedding, apply_rotary
from moetrain.models.rope_kernel import kernel_takes, rotary_eager

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def test_kernels_under_the_interpreter(run_interpreted):
    """This module's kernel tests, in a child pytest that turns the interpreter on before importing triton."""
    run_interpreted(__file__, select="interpreted")


def operands(b: int, seq: int, heads: int, hd: int, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """(x (B, L, n, hd), cos, sin (B, L, 1, hd) views of RotaryEmbedding's (B, 1, L, hd), dy (B, L, n, hd)), all in
    ``dtype``. x's entries span six decades, so that the two rounded products of a sum are often 2**16 and more
    apart and their fp32 sum rounds too (a rounding the kernels must make where the eager ``add`` makes it)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, seq, heads, hd, generator=gen) * 10.0 ** (6 * torch.rand(b, seq, heads, hd, generator=gen) - 3)
    positions = torch.randint(0, 40_000, (b, seq), generator=gen)
    cos, sin = RotaryEmbedding(hd, 1e6)(positions, dtype)
    dy = torch.randn(b, seq, heads, hd, generator=gen)
    return x.to(dtype), cos.transpose(1, 2), sin.transpose(1, 2), dy.to(dtype)


def graph_nodes(tensor: torch.Tensor) -> set[str]:
    """The names of the autograd nodes ``tensor`` was computed through."""
    seen, todo, names = set(), [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def eager_forward_backward(x, cos, sin, dy):
    """(y, dx) of the eager formula by torch's ops and autograd."""
    xg = x.clone().requires_grad_()
    y = rotary_eager(xg, cos, sin)
    y.backward(dy)
    return y.detach(), xg.grad


@pytest.mark.skipif(INTERPRETING, reason="the project's CPU: no interpreter")
def test_off_cuda_the_dispatcher_is_the_eager_formula():
    x, cos, sin, dy = operands(2, 37, 3, 64)
    assert kernel_takes(x, cos, sin) and not rope_kernel.kernel_applies(x, cos, sin)
    xg = x.clone().requires_grad_()
    y = apply_rotary(xg, cos, sin)
    y.backward(dy)
    assert type(y.grad_fn).__name__ == "AddBackward0"  # torch's ops, not the kernels' function
    y_ref, dx_ref = eager_forward_backward(x, cos, sin, dy)
    assert torch.equal(y.detach(), y_ref) and torch.equal(xg.grad, dx_ref)


def test_the_formula_gives_the_same_bits_in_either_layout():
    """Attention rotates (B, L, n, hd) where the kernels or variable-length attention take it and (B, n, L, hd)
    elsewhere: elementwise, so each element is the same either way."""
    x, cos, sin, _ = operands(2, 37, 3, 128)
    tokens_major = rotary_eager(x, cos, sin)
    heads_major = rotary_eager(x.transpose(1, 2), cos.transpose(1, 2), sin.transpose(1, 2))
    assert torch.equal(tokens_major, heads_major.transpose(1, 2))


def test_the_kernels_take_bf16_and_fp16_in_their_layout_only():
    x, cos, sin, _ = operands(2, 5, 3, 64)
    assert kernel_takes(x, cos, sin)
    assert kernel_takes(x.half(), cos.half(), sin.half())
    assert kernel_takes(x, cos[:1], sin[:1])  # one table row set for every row of the batch (broadcast along B)
    assert not kernel_takes(x.float(), cos.float(), sin.float())  # fp32: the eager formula
    assert not kernel_takes(x, cos.float(), sin.float())  # mixed dtypes promote eagerly: not the kernels' rounding
    assert not kernel_takes(x.transpose(1, 2), cos.transpose(1, 2), sin.transpose(1, 2))  # (B, n, L, hd)
    assert not kernel_takes(x, cos.detach().requires_grad_(), sin)  # the kernels give the tables no gradient
    odd, ocos, osin, _ = operands(1, 3, 2, 6)
    assert kernel_takes(odd, ocos, osin) and not kernel_takes(odd[..., :5], ocos[..., :5], osin[..., :5])
    wide, wcos, wsin, _ = operands(1, 2, 1, 2 * rope_kernel.MAX_HEAD_DIM)
    assert not kernel_takes(wide, wcos, wsin)


# odd sizes: 37 tokens of 3 heads fill no block; 64 and 128 as Qwen3's and other families' heads, 96 (a half of 48,
# padded to 64 and masked) and 2 (a half of one)
@pytest.mark.parametrize("b,seq,heads,hd,dtype", [(2, 37, 3, 64, torch.bfloat16), (2, 37, 3, 128, torch.bfloat16),
                                                  (2, 9, 5, 96, torch.bfloat16), (1, 4, 2, 2, torch.bfloat16),
                                                  (2, 37, 3, 128, torch.float16)])
def test_kernels_are_the_eager_formula_bit_for_bit_interpreted(interpreted, b, seq, heads, hd, dtype):
    x, cos, sin, dy = operands(b, seq, heads, hd, dtype=dtype)
    y = rope_kernel.rotary_kernel(x, cos, sin)
    dx = rope_kernel.rotary_backward_kernel(dy, cos, sin)
    y_ref, dx_ref = eager_forward_backward(x, cos, sin, dy)
    assert y.dtype == dx.dtype == dtype and y.shape == dx.shape == x.shape
    assert torch.equal(y, y_ref), f"{int((y != y_ref).sum())} of {y.numel()} outputs differ"
    assert torch.equal(dx, dx_ref), f"{int((dx != dx_ref).sum())} of {dx.numel()} gradients differ"


def test_tables_broadcast_along_the_batch_interpreted(interpreted):
    """cos/sin of one row for every row (B = 1 in the tables): stride 0, the same bits as eager broadcasting."""
    x, cos, sin, dy = operands(3, 11, 2, 64, seed=1)
    cos, sin = cos[:1], sin[:1]
    y_ref, dx_ref = eager_forward_backward(x, cos, sin, dy)
    assert torch.equal(rope_kernel.rotary_kernel(x, cos, sin), y_ref)
    assert torch.equal(rope_kernel.rotary_backward_kernel(dy, cos, sin), dx_ref)


def test_the_dispatcher_takes_the_kernels_where_they_apply_interpreted(interpreted, monkeypatch):
    """bf16 goes through the kernels' autograd function (their bits: the eager ones), fp32 and the switch off through
    torch's ops; the gradient of a non-contiguous ``dy`` comes back the same."""
    x, cos, sin, dy = operands(2, 7, 3, 64, seed=2)
    y_ref, dx_ref = eager_forward_backward(x, cos, sin, dy)
    for flag, dtype, through in (("1", torch.bfloat16, "_RotaryFnBackward"), ("1", torch.float32, "AddBackward0"),
                                 ("0", torch.bfloat16, "AddBackward0")):
        monkeypatch.setenv(rope_kernel.ENV, flag)
        xg = x.to(dtype).clone().requires_grad_()
        y = apply_rotary(xg, cos.to(dtype), sin.to(dtype))
        y.backward(dy.to(dtype).transpose(1, 2).contiguous().transpose(1, 2))  # (B, L, n, hd) of another layout
        assert type(y.grad_fn).__name__ == through, (flag, dtype)
        if dtype == torch.bfloat16:
            assert torch.equal(y.detach(), y_ref) and torch.equal(xg.grad, dx_ref)


def test_an_attention_layer_with_and_without_the_kernels_interpreted(interpreted, monkeypatch):
    """Grouped-query attention with per-head q/k norms (Qwen3's) in bf16: the kernels' tokens-major rotary and the
    eager one after the transpose give the same output and the same input and projection gradients."""
    cfg = ModelConfig(family="qwen3_moe", vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16, qk_norm="head", head_dim=32)
    torch.manual_seed(0)
    attn = Attention(cfg, 0).to(torch.bfloat16)
    x = torch.randn(2, 13, 64).bfloat16()
    cos, sin = RotaryEmbedding(32, 1e6)(torch.arange(13)[None].expand(2, -1), torch.bfloat16)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv(rope_kernel.ENV, flag)
        xg = x.clone().requires_grad_()
        out = attn(xg, cos, sin, None)
        assert ("_RotaryFnBackward" in graph_nodes(out)) == (flag == "1")
        params = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        results.append((out.detach(), *torch.autograd.grad(out, [xg, *params], torch.ones_like(out))))
    for with_kernels, eager in zip(*results, strict=True):
        assert torch.equal(with_kernels, eager)
