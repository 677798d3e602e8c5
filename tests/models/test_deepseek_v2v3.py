"""DeepSeek-V2 and DeepSeek-V3 against transformers: tiny random ``DeepseekV2ForCausalLM`` (with and without a
query latent, greedy and group-limited routing, YaRN) and ``DeepseekV3ForCausalLM`` (sigmoid noaux_tc routing
with a non-zero correction bias) are saved sharded, loaded with ``moetrain.from_pretrained`` and must give the
same fp32 logits; export must load back into transformers. Guards check that each feature under test changes
the result, so the parity cannot pass by accident.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from parity_helpers import ATOL, VOCAB, assert_export_round_trip, assert_logits_match
from safetensors.torch import save_file
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

import moetrain
from moetrain.config import ConfigError, ModelConfig
from moetrain.models import losses
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf_configs import config_from_hf, config_to_hf
from moetrain.models.router import TopKRouter

CASES = ["deepseek_v2", "deepseek_v2_group", "deepseek_v3"]
HF = {"deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
      "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM)}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tiny_hf, save_hf):
    hf = tiny_hf(case)
    path = save_hf(hf)
    model = assert_logits_match(hf, path, case)
    assert model.config.family == case.removesuffix("_group")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_guards_each_feature_changes_the_logits(tiny_hf, save_hf):
    """Group limiting, the correction bias, YaRN and rope interleaving each change the output of the tiny models,
    so the parity above exercises them."""
    ids = torch.randint(0, VOCAB, (2, 12))
    grouped = moetrain.from_pretrained(save_hf(tiny_hf("deepseek_v2_group"), "v2g"))
    base = _logits(grouped, ids)
    for block in grouped.moe_blocks():
        block.gate.topk_method = "greedy"
    assert (_logits(grouped, ids) - base).abs().max() > 1e-3, "group limiting never changed a choice"

    v3 = moetrain.from_pretrained(save_hf(tiny_hf("deepseek_v3"), "v3"))
    base = _logits(v3, ids)
    for block in v3.moe_blocks():
        block.gate.e_score_correction_bias.zero_()
    assert (_logits(v3, ids) - base).abs().max() > 1e-3, "the correction bias never changed a choice"

    v3 = moetrain.from_pretrained(save_hf(tiny_hf("deepseek_v3"), "v3b"))
    plain = MoEForCausalLM(ModelConfig(**{**v3.config.to_dict(), "rope_scaling": None}))
    plain.load_state_dict(v3.state_dict())
    assert (_logits(plain, ids) - _logits(v3, ids)).abs().max() > 1e-3, "YaRN made no difference"
    for layer in plain.model.layers:
        layer.self_attn.interleaved = False
    plain_noninterleaved = _logits(plain, ids)
    for layer in plain.model.layers:
        layer.self_attn.interleaved = True
    assert (plain_noninterleaved - _logits(plain, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("case", CASES)
def test_export_round_trip_loads_in_transformers(case, tiny_hf, save_hf, tmp_path):
    out_dir = tmp_path / "export"
    model, _ = assert_export_round_trip(tiny_hf(case), save_hf, out_dir)
    # config.json alone (no moetrain_config.json) rebuilds the same config
    hf_json = json.loads((out_dir / "config.json").read_text())
    assert config_from_hf(hf_json, name=model.config.name) == model.config


# ---------------------------------------------------------------------------------------------- routers
def _router_pair(case: str, tiny_hf):
    hf = tiny_hf(case)
    hf_gate = hf.model.layers[1].mlp.gate
    cfg_dict = config_to_hf(config_from_hf(hf.config.to_dict()))
    ours = TopKRouter(config_from_hf(cfg_dict))
    ours.load_state_dict(hf_gate.state_dict())
    return hf_gate, ours


@pytest.mark.parametrize("case", CASES)
def test_router_choices_and_weights_match_transformers(case, tiny_hf):
    hf_gate, ours = _router_pair(case, tiny_hf)
    assert isinstance(hf_gate, (DeepseekV2TopkRouter, DeepseekV3TopkRouter))
    x = torch.randn(64, ours.weight.shape[1])
    with torch.no_grad():
        ref_logits, ref_w, ref_idx = hf_gate(x)
        routing = ours(x, batch_size=4)
    torch.testing.assert_close(routing.logits, ref_logits)
    # both return top-k unsorted: compare per token as expert -> weight maps
    order_ref, order = ref_idx.argsort(-1), routing.topk_idx.argsort(-1)
    torch.testing.assert_close(routing.topk_idx.gather(1, order), ref_idx.gather(1, order_ref))
    torch.testing.assert_close(routing.topk_weight.gather(1, order), ref_w.gather(1, order_ref))
    assert int(routing.counts.sum()) == x.shape[0] * ours.top_k


def test_group_limited_routing_equals_a_per_token_loop():
    cfg = ModelConfig(family="deepseek_v2", hidden_size=16, num_attention_heads=2, num_experts=12,
                      num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                      kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)
    router = TopKRouter(cfg)
    x = torch.randn(40, 16)
    routing = router(x, batch_size=1)
    probs = torch.softmax(x @ router.weight.T, dim=-1)
    for t in range(x.shape[0]):
        groups = probs[t].view(4, 3).max(dim=-1).values.topk(2).indices.tolist()
        allowed = [e for g in groups for e in range(3 * g, 3 * g + 3)]
        best = sorted(allowed, key=lambda e: -probs[t, e].item())[:3]
        assert sorted(routing.topk_idx[t].tolist()) == sorted(best)


def test_sigmoid_seq_balance_loss_is_the_v3_formula():
    """DeepSeek-V3's sequence-wise loss: alpha * sum_i f_i P_i per sequence, f_i = E / (k L) * #(i in top-k),
    P_i = mean over the sequence of s_i / sum_j s_j (s the sigmoid scores), averaged over sequences."""
    cfg = ModelConfig.from_preset("tiny-deepseek-v3", aux_loss_coef=0.3)
    router = TopKRouter(cfg)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(0, 0.2)
    b, seq = 3, 10
    x = torch.randn(b * seq, cfg.hidden_size)
    routing = router(x, batch_size=b)
    scores = torch.sigmoid(x @ router.weight.T)
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    total = 0.0
    for s in range(b):
        rows = range(s * seq, (s + 1) * seq)
        for i in range(e):
            f = e / (k * seq) * sum(int(i in routing.topk_idx[t].tolist()) for t in rows)
            p = sum((scores[t, i] / scores[t].sum()).item() for t in rows) / seq
            total += f * p
    torch.testing.assert_close(routing.aux_loss, torch.tensor(0.3 * total / b), rtol=1e-5, atol=1e-7)
    direct = losses.deepseek_seq_balance_loss(scores / scores.sum(-1, keepdim=True), routing.topk_idx, e, batch_size=b)
    torch.testing.assert_close(routing.aux_loss, 0.3 * direct)


def test_correction_bias_stays_fp32_when_the_model_is_cast(tiny_hf, save_hf):
    path = save_hf(tiny_hf("deepseek_v3"))
    model = moetrain.from_pretrained(path, dtype=torch.bfloat16)
    fp32 = moetrain.from_pretrained(path)
    for cast, ref in zip(model.moe_blocks(), fp32.moe_blocks(), strict=True):
        assert cast.gate.e_score_correction_bias.dtype == torch.float32
        assert torch.equal(cast.gate.e_score_correction_bias, ref.gate.e_score_correction_bias)
    before = fp32.moe_blocks()[0].gate.e_score_correction_bias.clone()
    fp32.to(torch.bfloat16)
    assert torch.equal(fp32.moe_blocks()[0].gate.e_score_correction_bias, before)
    assert fp32.moe_blocks()[0].gate.weight.dtype == torch.bfloat16


def test_multi_token_prediction_layers_are_skipped(tiny_hf, save_hf):
    """DeepSeek-V3 releases append an MTP module as layer num_hidden_layers; the causal LM loads without it."""
    hf = tiny_hf("deepseek_v3")
    path = save_hf(hf)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    extra = {"model.layers.3.eh_proj.weight": torch.randn(32, 64), "model.layers.3.enorm.weight": torch.ones(32)}
    save_file(extra, str(path / "mtp.safetensors"))
    index["weight_map"].update({name: "mtp.safetensors" for name in extra})
    index_path.write_text(json.dumps(index))
    model = moetrain.from_pretrained(path)
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name,published", [("deepseek-v2-lite", 15.7), ("deepseek-v3", 671.0)])
def test_presets_have_the_published_totals_and_transformers_counts(name, published):
    cfg = ModelConfig.from_preset(name)
    total = cfg.param_counts()["total"]
    assert abs(total / 1e9 - published) <= 0.05, f"{name}: {total / 1e9:.3f} B"
    config_cls, model_cls = HF[cfg.family]
    with torch.device("meta"):
        hf = model_cls(config_cls(**config_to_hf(cfg)))
    assert sum(p.numel() for p in hf.parameters()) == total


@pytest.mark.parametrize("name", ["tiny-deepseek-v2", "tiny-deepseek-v3"])
def test_tiny_presets_count_and_run(name):
    cfg = ModelConfig.from_preset(name)
    model = MoEForCausalLM(cfg)
    assert model.num_parameters() == cfg.param_counts()["total"]
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.aux_loss > 0
    attn = model.model.layers[0].self_attn
    assert all(p.grad is not None for p in attn.parameters())


@pytest.mark.parametrize("override,key", [
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 5}, "topk_group"),
    ({"scoring_func": "tanh"}, "scoring_func"),
    ({"topk_method": "greedy", "bias_update_speed": 0.01}, "bias_update_speed"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
    ({"rope_scaling": {"type": "yarn", "factor": 2}}, "original_max_position_embeddings"),
])
def test_bad_mla_and_routing_configs_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_preset("tiny-deepseek-v3", **override)


def test_other_families_refuse_deepseek_routing_and_yarn():
    with pytest.raises(ConfigError, match="scoring_func"):
        ModelConfig(family="mixtral", scoring_func="sigmoid")
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelConfig(family="qwen3_moe", rope_scaling={"type": "yarn", "factor": 2,
                                                      "original_max_position_embeddings": 64})


def test_v2_config_json_refuses_what_transformers_and_deepseek_disagree_on(tiny_hf):
    cfg = tiny_hf("deepseek_v2").config.to_dict()
    with pytest.raises(ConfigError, match="norm_topk_prob"):
        config_from_hf({**cfg, "norm_topk_prob": True})
    with pytest.raises(ConfigError, match="scoring_func"):
        config_from_hf({**cfg, "scoring_func": "sigmoid"})


# ---------------------------------------------------------------------------------------------- planning
def test_expert_parallel_plan_of_deepseek_v3():
    """Dense part replicated at 16 B/param on every GPU; experts split over ranks, so that the ranks together hold
    each expert once; the offload columns move exactly the 12 B/param of expert state from GPU to host."""
    from moetrain.offload.plan_parallel import GiB, expert_parallel_plan, plan_expert_parallel

    cfg = ModelConfig.from_preset("deepseek-v3")
    counts = cfg.param_counts()
    for ws in (1, 8, 64):
        p = expert_parallel_plan(cfg, ws)
        assert p.experts_per_rank == 256 // ws
        assert p.expert_params_per_rank * ws == counts["expert"]
        assert p.gpu_no_offload == 16 * counts["dense"] + 16 * counts["expert"] // ws
        assert p.gpu_no_offload - p.gpu_offload == p.host_offload == 12 * counts["expert"] // ws
    one = expert_parallel_plan(cfg, 1)
    assert one.gpu_no_offload == 16 * counts["total"]  # about 10 TB: why V3 needs many GPUs
    # V3's replicated dense part alone (17 B params) outgrows an 80 GiB GPU: the report must say so
    assert 16 * counts["dense"] > 80 * GiB
    assert "dense part alone" in plan_expert_parallel(cfg)
    assert "dense part alone" not in plan_expert_parallel(ModelConfig.from_preset("deepseek-v2-lite"))
    report = plan_expert_parallel(cfg)
    for ws in (1, 8, 64):
        p = expert_parallel_plan(cfg, ws)
        assert f"{p.gpu_no_offload / GiB:.1f} GiB" in report and f"{p.host_offload / GiB:.1f} GiB" in report
