"""Under bf16 autocast over fp32 weights (``precision: bf16-mixed``), the residual stream stays in bf16 as in a
bf16 model: every decoder layer receives and returns bf16, norms hand bf16 to the projections, and weights and
gradients stay fp32. Without autocast (the CPU's ``32-true``, the parity tests) nothing changes."""

from __future__ import annotations

import torch

from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM


def tiny_model() -> MoEForCausalLM:
    """2 layers (a dense first layer, then MoE with shared experts), hidden 32, fp32 weights."""
    torch.manual_seed(0)
    cfg = ModelConfig(family="deepseek_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=16, first_k_dense_replace=1, num_shared_experts=1)
    return MoEForCausalLM(cfg)


def _layer_dtypes(model, ids, autocast: bool):
    seen = []
    hooks = [layer.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out[0].dtype)))
             for layer in model.model.layers]
    norm_out = []
    hooks.append(model.model.layers[0].input_layernorm.register_forward_hook(
        lambda m, args, out: norm_out.append(out.dtype)))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, labels=ids)
    finally:
        for h in hooks:
            h.remove()
    return out, seen, norm_out


def test_residual_stream_is_bf16_under_autocast():
    model = tiny_model()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    out, seen, norm_out = _layer_dtypes(model, ids, autocast=True)
    assert seen and all(a == torch.bfloat16 and b == torch.bfloat16 for a, b in seen)
    assert norm_out == [torch.bfloat16]
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(p.dtype == torch.float32 for p in model.parameters())
    assert all(g.dtype == torch.float32 for g in grads)


def test_fp32_without_autocast_and_close_to_it_with():
    model = tiny_model()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    ref, seen, _ = _layer_dtypes(model, ids, autocast=False)
    assert all(a == torch.float32 and b == torch.float32 for a, b in seen)
    mixed, _, _ = _layer_dtypes(model, ids, autocast=True)
    # bf16 has 8 bits of mantissa: the loss of a random tiny model moves by well under a percent
    assert abs(mixed.loss.item() - ref.loss.item()) < 0.02 * ref.loss.item()
