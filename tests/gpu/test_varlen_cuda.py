"""Packed documents through variable-length flash attention (``moetrain.models.varlen``) against the dense mask
SDPA took before: one attention layer's output and gradients, and a whole model's loss and gradients, in bf16; and
grouped queries' key/value heads passed unrepeated against repeated ones with the dense mask.

Run on the GPU machine: ``python -m pytest -q tests/gpu/test_varlen_cuda.py``.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from moetrain.config import ModelConfig
from moetrain.models.attention import Attention, dense_mask
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.varlen import ENV, _varlen_fn, document_spans, varlen_applies

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def packed_ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """(B, L) document ids: documents of 1 to 600 tokens packed along each row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths, total = [], 0
        while total < seq:
            n = min(int(torch.randint(1, 600, (1,), generator=g)), seq - total)
            lengths.append(n)
            total += n
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(rows).cuda()


def config(heads: int = 16, kv_heads: int | None = None) -> ModelConfig:
    return ModelConfig(family="deepseek_moe", vocab_size=512, hidden_size=2048, intermediate_size=512,
                       num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads, num_experts=8,
                       num_experts_per_tok=2, moe_intermediate_size=128)


def test_this_torch_has_the_flash_path():
    assert _varlen_fn() is not None, "torch.nn.attention.varlen.varlen_attn is missing: packed rows use the dense mask"


@pytest.mark.parametrize("kv_heads", [None, 4])
def test_attention_layer_equals_the_dense_mask(kv_heads):
    torch.manual_seed(0)
    attn = Attention(config(kv_heads=kv_heads), 0).cuda().to(torch.bfloat16)
    model = MoEForCausalLM(config(kv_heads=kv_heads))
    docs = packed_ids(4, 2048)
    spans = document_spans(docs)
    x = torch.randn(4, 2048, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(2048, device="cuda")[None].expand(4, -1)
    cos, sin = model.model.rotary.cuda()(pos, torch.bfloat16)
    assert varlen_applies(x, attn.head_dim)
    dout = torch.randn(4, 2048, 2048, device="cuda", dtype=torch.bfloat16)
    outs, grads = [], []
    for mask in (spans, dense_mask(spans)):
        out = attn(x, cos, sin, mask)
        gx, gq = torch.autograd.grad(out, (x, attn.q_proj.weight), dout)
        outs.append(out.float())
        grads.append((gx.float(), gq.float()))
    assert (outs[0] - outs[1]).abs().max() <= 2e-2 * outs[1].abs().max()
    for a, b in zip(grads[0], grads[1], strict=True):
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()


def test_model_loss_and_gradients_equal_with_and_without(monkeypatch):
    torch.manual_seed(0)
    model = MoEForCausalLM(config()).cuda()
    ids = torch.randint(0, 512, (2, 2048), device="cuda")
    docs = packed_ids(2, 2048, seed=1)
    losses, grads = [], []
    for flag in ("1", "0"):
        monkeypatch.setenv(ENV, flag)
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids, document_ids=docs).loss
        loss.backward()
        losses.append(float(loss))
        grads.append(model.model.layers[1].self_attn.k_proj.weight.grad.clone())
    assert abs(losses[0] - losses[1]) <= 2e-3 * abs(losses[1])
    assert (grads[0] - grads[1]).abs().max() <= 3e-2 * grads[1].abs().max()


def test_a_batch_with_its_spans_runs_forward_without_a_device_read():
    """A training batch brings its documents' spans from host memory (``collate_rows``, pinned): the forward then
    reads nothing back from the device (``set_sync_debug_mode`` raises on any synchronizing call), and its loss is
    the loss the forward computes from the device ids."""
    from moetrain.models.varlen import batch_spans
    from moetrain.training.data import collate_rows

    torch.manual_seed(0)
    model = MoEForCausalLM(config()).cuda()
    docs = packed_ids(2, 2048, seed=1).cpu()
    rows = [{"input_ids": torch.randint(0, 512, (2048,)), "document_ids": d} for d in docs]
    batch = {k: v.pin_memory().cuda(non_blocking=True) if isinstance(v, torch.Tensor) else v
             for k, v in collate_rows(rows).items()}
    ids = batch["input_ids"]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        reference = model(ids, labels=ids, document_ids=batch["document_ids"]).loss
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = model(ids, labels=ids, document_ids=batch["document_ids"], spans=batch_spans(batch)).loss
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(loss, reference)


def test_this_torch_takes_grouped_key_value_heads_unrepeated():
    """torch's ``varlen_attn`` with ``enable_gqa`` (2.13 has it) and flash attention as its backend here: packed
    documents' key/value heads then go in unrepeated (``varlen._kv_heads_unrepeated``)."""
    from moetrain.models.varlen import _kv_heads_unrepeated

    if "enable_gqa" not in inspect.signature(_varlen_fn()).parameters:
        pytest.skip(f"torch {torch.__version__}: varlen_attn has no enable_gqa, key/value heads are repeated")
    assert _kv_heads_unrepeated(torch.cuda.current_device())


def test_grouped_key_value_heads_unrepeated_equal_the_dense_mask():
    """Qwen3's heads (32 query, 4 key/value of 128) over packed documents, tokens-major as attention passes them:
    ``varlen_causal_attention`` with the key/value heads as they are against ``repeat_interleave`` and SDPA with the
    dense mask, bf16, forward and backward (q, k and v's gradients) to bf16's precision."""
    from moetrain.models.attention import dense_mask
    from moetrain.models.varlen import varlen_causal_attention

    torch.manual_seed(0)
    b, seq, nh, nkv, hd = 2, 4096, 32, 4, 128
    spans = document_spans(packed_ids(b, seq, seed=2))
    q = torch.randn(b * seq, nh, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b * seq, nkv, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b * seq, nkv, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(b * seq, nh, hd, device="cuda", dtype=torch.bfloat16)
    out = varlen_causal_attention(q, k, v, spans=spans)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    def heads_major(t: torch.Tensor) -> torch.Tensor:  # (B * L, n, hd) -> (B, n, L, hd)
        return t.view(b, seq, t.shape[1], hd).transpose(1, 2)

    ref = torch.nn.functional.scaled_dot_product_attention(
        heads_major(q), heads_major(k).repeat_interleave(nh // nkv, dim=1),
        heads_major(v).repeat_interleave(nh // nkv, dim=1), attn_mask=dense_mask(spans))
    ref = ref.transpose(1, 2).reshape(b * seq, nh, hd)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert out.shape == ref.shape and (out.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()
    for got, want in zip(grads, ref_grads, strict=True):
        assert (got.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()
