"""``model.residual_dtype: bf16``: under bf16 autocast over fp32 weights the residual stream stays bf16, as in a bf16
model: every decoder layer receives and returns bf16, norms hand bf16 on, and weights and gradients stay fp32. The
default (fp32) and any run without autocast (the CPU's ``32-true``, the parity tests) are unchanged."""

from __future__ import annotations

import pytest
import torch

from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM


def tiny_model(residual: str) -> MoEForCausalLM:
    """2 layers (a dense first layer, then MoE with shared experts), hidden 32, fp32 weights."""
    torch.manual_seed(0)
    cfg = ModelConfig(family="deepseek_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=16, first_k_dense_replace=1, num_shared_experts=1)
    model = MoEForCausalLM(cfg)
    model.set_residual_dtype(residual)
    return model


def _run(model, ids, autocast: bool):
    """(output, (input, output) dtype of each decoder layer, the first norm's output dtype)."""
    seen, norm_out = [], []
    hooks = [layer.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out[0].dtype)))
             for layer in model.model.layers]
    hooks.append(model.model.layers[0].input_layernorm.register_forward_hook(
        lambda m, args, out: norm_out.append(out.dtype)))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, labels=ids)
    finally:
        for h in hooks:
            h.remove()
    return out, seen, norm_out


IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def test_bf16_residual_stream_under_autocast():
    model = tiny_model("bf16")
    out, seen, norm_out = _run(model, IDS, autocast=True)
    assert seen and all(a == torch.bfloat16 and b == torch.bfloat16 for a, b in seen)
    assert norm_out == [torch.bfloat16]
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(p.dtype == torch.float32 for p in model.parameters())
    assert all(g.dtype == torch.float32 for g in grads)


def test_fp32_residual_is_the_default_and_autocast_off_changes_nothing():
    fp32, bf16 = tiny_model("fp32"), tiny_model("bf16")
    assert MoEForCausalLM(fp32.config).residual_dtype == "fp32"
    _, seen, _ = _run(fp32, IDS, autocast=True)
    assert all(a == torch.float32 and b == torch.float32 for a, b in seen)  # autocast over fp32 weights
    plain, seen, _ = _run(bf16, IDS, autocast=False)
    assert all(a == torch.float32 and b == torch.float32 for a, b in seen)
    assert torch.equal(plain.loss, _run(fp32, IDS, autocast=False)[0].loss)  # bit for bit without autocast
    # bf16 has 8 bits of mantissa: the loss of a random tiny model moves by well under a percent
    mixed = _run(bf16, IDS, autocast=True)[0]
    assert mixed.loss.item() != plain.loss.item()
    assert abs(mixed.loss.item() - plain.loss.item()) < 0.02 * plain.loss.item()


def test_other_values_are_refused():
    with pytest.raises(ValueError, match="fp32 or bf16"):
        tiny_model("fp16")
