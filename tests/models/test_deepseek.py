"""DeepSeek-MoE (v1), which transformers does not ship: checkpoint names and config.json of
deepseek-ai/deepseek-moe-16b-base, the MoE block against transformers' ``DeepseekV2Moe`` configured to
DeepSeek-MoE's routing, the dense first layer against ``LlamaDecoderLayer``, and the balance losses
against a loop-by-loop transcription of DeepSeek's ``MoEGate``.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from moetrain.config import ModelConfig
from moetrain.models import keymap
from moetrain.models.attention import RotaryEmbedding
from moetrain.models.decoder import DecoderLayer, MoEForCausalLM
from moetrain.models.hf import export_hf, load_config
from moetrain.models.hf_configs import config_from_hf, config_to_hf
from moetrain.models.moe import MoEBlock

# deepseek-ai/deepseek-moe-16b-base, config.json as published.
DEEPSEEK_MOE_16B_CONFIG = {
    "architectures": ["DeepseekForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "max_position_embeddings": 4096,
    "model_type": "deepseek",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 28,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0",
    "use_cache": True,
    "vocab_size": 102400,
}

TINY = dict(family="deepseek_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=3,
            moe_intermediate_size=16, num_shared_experts=2, first_k_dense_replace=1, aux_loss="seq", aux_loss_coef=0.01)


def expected_deepseek_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a DeepSeek-MoE checkpoint (the layout of deepseek-moe-16b-base)."""
    h, v = cfg.hidden_size, cfg.vocab_size
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = (h,)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
        for proj in "qkvo":
            out[f"{p}.self_attn.{proj}_proj.weight"] = (h, h)
        if i < cfg.first_k_dense_replace:
            mlps = {f"{p}.mlp": cfg.intermediate_size}
        else:
            out[f"{p}.mlp.gate.weight"] = (cfg.num_experts, h)
            mlps = {f"{p}.mlp.experts.{e}": cfg.moe_intermediate_size for e in range(cfg.num_experts)}
            mlps[f"{p}.mlp.shared_experts"] = cfg.moe_intermediate_size * cfg.num_shared_experts
        for prefix, width in mlps.items():
            out[f"{prefix}.gate_proj.weight"] = (width, h)
            out[f"{prefix}.up_proj.weight"] = (width, h)
            out[f"{prefix}.down_proj.weight"] = (h, width)
    return out


def test_checkpoint_names_of_the_16b_preset():
    # the real widths and expert count; 3 of the 28 layers (dense layer 0, then MoE) keep the test fast
    cfg = ModelConfig.from_preset("deepseek-moe-16b", num_hidden_layers=3)
    with torch.device("meta"):
        model = MoEForCausalLM(cfg)
    ours = {keymap.to_hf_name(cfg.family, n): tuple(t.shape) for n, t in model.state_dict().items()}
    assert ours == expected_deepseek_names(cfg)


def test_export_writes_deepseek_names_and_config(tmp_path):
    cfg = ModelConfig(**TINY)
    weight_map = export_hf(MoEForCausalLM(cfg), tmp_path, max_shard_bytes=32 * 1024)
    assert set(weight_map) == set(expected_deepseek_names(cfg))
    written = json.loads((tmp_path / "config.json").read_text())
    assert set(written) == set(DEEPSEEK_MOE_16B_CONFIG)
    assert written["model_type"] == "deepseek" and written["auto_map"] == DEEPSEEK_MOE_16B_CONFIG["auto_map"]
    (tmp_path / "moetrain_config.json").unlink()
    assert load_config(tmp_path).to_dict() | {"name": cfg.name} == cfg.to_dict()


def test_config_json_of_the_16b_preset():
    preset = ModelConfig.from_preset("deepseek-moe-16b")
    # with_code: the auto_map, which only a writer that also writes the modelling files may add
    assert config_to_hf(preset, torch_dtype="bfloat16", with_code=True) == DEEPSEEK_MOE_16B_CONFIG
    assert config_from_hf(DEEPSEEK_MOE_16B_CONFIG, name=preset.name) == preset


# ---------------------------------------------------------------------------------------------- MoE block
def _reference_moe(block: MoEBlock, cfg: ModelConfig) -> DeepseekV2Moe:
    """transformers' DeepSeek-V2 MoE configured to DeepSeek-MoE routing, holding ``block``'s weights."""
    ref_cfg = transformers.DeepseekV2Config(
        hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size, n_routed_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, n_shared_experts=cfg.num_shared_experts, topk_method="greedy",
        n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False, hidden_act="silu",
    )
    ref = DeepseekV2Moe(ref_cfg)
    with torch.no_grad():
        ref.gate.weight.copy_(block.gate.weight)
        for e, expert in enumerate(block.experts):
            ref.experts.gate_up_proj[e].copy_(torch.cat([expert.gate_proj.weight, expert.up_proj.weight], 0))
            ref.experts.down_proj[e].copy_(expert.down_proj.weight)
        ref.shared_experts.load_state_dict(block.shared_experts.state_dict())
    return ref


def test_moe_block_equals_transformers_deepseek_v2_moe(randomize):
    cfg = ModelConfig(**TINY)
    block = randomize(MoEBlock(cfg, layer_idx=1), std=0.2)
    ref = _reference_moe(block, cfg)
    x = torch.randn(2, 7, cfg.hidden_size, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, routing = block(x)
    expected = ref(x_ref)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert routing.counts.sum() == 2 * 7 * cfg.num_experts_per_tok
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block.gate.weight.grad, ref.gate.weight.grad, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- dense layer
def test_dense_layer_equals_llama_decoder_layer(randomize):
    cfg = ModelConfig(**TINY)
    layer = randomize(DecoderLayer(cfg, layer_idx=0, aux_scale=1.0))
    assert not layer.is_moe
    llama_cfg = transformers.LlamaConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.kv_heads,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
    )
    llama_cfg._attn_implementation = "eager"
    ref = LlamaDecoderLayer(llama_cfg, layer_idx=0)
    ref.load_state_dict(layer.state_dict())  # same names: self_attn.{q,k,v,o}_proj, mlp.*, both norms
    b, seq = 2, 9
    x = torch.randn(b, seq, cfg.hidden_size)
    pos = torch.arange(seq)[None].expand(b, -1)
    cos, sin = RotaryEmbedding(cfg.attn_head_dim, cfg.rope_theta)(pos, x.dtype)
    out, routing = layer(x, cos, sin, None, None)
    causal = torch.full((seq, seq), float("-inf")).triu(1)[None, None].expand(b, 1, seq, seq)
    expected = ref(x, attention_mask=causal, position_ids=pos,
                   position_embeddings=LlamaRotaryEmbedding(llama_cfg)(x, pos))
    expected = expected[0] if isinstance(expected, tuple) else expected
    assert routing is None
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- balance losses
def deepseek_gate_aux_naive(logits: torch.Tensor, bsz: int, seq_len: int, top_k: int, alpha: float,
                            seq_aux: bool) -> torch.Tensor:
    """DeepSeek's ``MoEGate.forward`` aux loss (softmax scoring), written with explicit loops.

    seq_aux: for each sequence, ce_e = count_e / (seq_len * top_k / E), loss_b = sum_e ce_e * mean_t score_te;
    aux = alpha * mean_b loss_b. Otherwise: fi_e = E * count_e / (T * top_k), Pi_e = mean_t score_te,
    aux = alpha * sum_e Pi_e * fi_e. Counts carry no gradient.
    """
    scores = logits.softmax(dim=-1)  # (T, E)
    n_experts = scores.shape[1]
    topk = torch.topk(scores, top_k, dim=-1).indices.tolist()
    if seq_aux:
        per_seq = []
        for b in range(bsz):
            counts = [0.0] * n_experts
            for t in range(seq_len):
                for e in topk[b * seq_len + t]:
                    counts[e] += 1.0
            loss_b = scores.new_zeros(())
            for e in range(n_experts):
                ce = counts[e] / (seq_len * top_k / n_experts)
                mean_score = sum(scores[b * seq_len + t, e] for t in range(seq_len)) / seq_len
                loss_b = loss_b + ce * mean_score
            per_seq.append(loss_b)
        return alpha * sum(per_seq) / bsz
    tokens = bsz * seq_len
    counts = [0.0] * n_experts
    for row in topk:
        for e in row:
            counts[e] += 1.0
    total = scores.new_zeros(())
    for e in range(n_experts):
        fi = n_experts * counts[e] / (tokens * top_k)
        pi = sum(scores[t, e] for t in range(tokens)) / tokens
        total = total + pi * fi
    return alpha * total


@pytest.mark.parametrize("aux_kind", ["seq", "token"])
def test_balance_loss_equals_deepseek_gate(aux_kind, randomize):
    cfg = ModelConfig(**{**TINY, "aux_loss": aux_kind})
    model = randomize(MoEForCausalLM(cfg), std=0.2)
    b, seq = 3, 6
    ids = torch.randint(0, cfg.vocab_size, (b, seq))
    out = model(ids)
    assert sorted(out.routings) == cfg.moe_layers == [1, 2]
    expected = [deepseek_gate_aux_naive(r.logits, b, seq, cfg.num_experts_per_tok, cfg.aux_loss_coef,
                                        seq_aux=aux_kind == "seq") for r in out.routings.values()]
    for ours, ref in zip(out.layer_aux_losses, expected, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-7, rtol=1e-6)
    # DeepSeek adds every layer's loss with the full alpha (no averaging over layers)
    torch.testing.assert_close(out.aux_loss, sum(expected), atol=1e-7, rtol=1e-6)
    # and the gradient reaching each router is the same
    gate = model.model.layers[1].mlp.gate.weight
    (g_ours,) = torch.autograd.grad(out.aux_loss, gate, retain_graph=True)
    (g_ref,) = torch.autograd.grad(sum(expected), gate)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-8, rtol=1e-5)
    assert g_ours.abs().max() > 0
