"""Loading edge cases: transformers-5's fused expert layout, tied embeddings, moetrain checkpoints, and the
errors for unsupported configs and broken checkpoints (each must name the key, file or tensor)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

import moetrain
from moetrain.config import ConfigError, ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf import export_hf, from_pretrained
from moetrain.models.hf_configs import config_from_hf, config_to_hf
from moetrain.shards import ShardError, read_weight_map

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def _qwen3(randomize, **kw) -> transformers.Qwen3MoeForCausalLM:
    cfg = transformers.Qwen3MoeConfig(**{**BASE, **kw}, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                      head_dim=16, norm_topk_prob=True)
    return randomize(transformers.Qwen3MoeForCausalLM(cfg)).eval()


def _same_logits(hf, model) -> None:
    ids = torch.randint(0, BASE["vocab_size"], (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_fused_expert_layout_loads(family, randomize, tmp_path):
    """transformers-5 keeps experts fused in memory (gate_up_proj (E, 2I, H), down_proj (E, H, I)); a file
    written straight from that state dict must load like the per-expert layout."""
    if family == "mixtral":
        hf = randomize(transformers.MixtralForCausalLM(transformers.MixtralConfig(**BASE, num_local_experts=4))).eval()
    else:
        hf = _qwen3(randomize)
    state = hf.state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in state), "expected transformers' fused layout in memory"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    hf.config.to_json_file(tmp_path / "config.json")
    _same_logits(hf, from_pretrained(tmp_path))


def test_tied_embeddings(randomize, save_hf):
    hf = _qwen3(randomize, tie_word_embeddings=True)
    path = save_hf(hf)
    assert "lm_head.weight" not in read_weight_map(path)
    model = from_pretrained(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _same_logits(hf, model)


def test_dtype_and_rotary_buffer(randomize, save_hf):
    model = from_pretrained(save_hf(_qwen3(randomize)), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = MoEForCausalLM(model.config).model.rotary.inv_freq
    assert model.model.rotary.inv_freq.dtype == torch.float32  # kept fp32 like transformers
    torch.testing.assert_close(model.model.rotary.inv_freq, reference, atol=0, rtol=0)


def test_moetrain_config_is_preferred(tmp_path):
    """A moetrain checkpoint carries fields config.json cannot hold (the router z-loss, the name)."""
    cfg = ModelConfig.from_preset("tiny-olmoe", router_z_loss_coef=1e-3, name="mine")
    model = MoEForCausalLM(cfg)
    export_hf(model, tmp_path)
    assert "router_z_loss_coef" not in json.loads((tmp_path / "config.json").read_text())
    loaded = moetrain.from_pretrained(tmp_path)
    assert loaded.config == cfg
    (tmp_path / "moetrain_config.json").unlink()
    from_hf = moetrain.from_pretrained(tmp_path)
    assert from_hf.config.router_z_loss_coef == 0.0
    for a, b in zip(model.state_dict().values(), from_hf.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_model_type_is_refused():
    with pytest.raises(ConfigError, match="model_type.*'llama'.*supported model types"):
        config_from_hf({"model_type": "llama"})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("rope_scaling", {"type": "yarn", "factor": 4.0}),
        ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
        ("hidden_act", "gelu"),
        ("use_sliding_window", True),
        ("quantization_config", {"quant_method": "fp8"}),
    ],
)
def test_unsupported_qwen_options_name_the_key(key, value):
    hf = config_to_hf(ModelConfig.from_preset("tiny-qwen3-moe"))
    hf[key] = value
    with pytest.raises(ConfigError, match=key):
        config_from_hf(hf)


@pytest.mark.parametrize(("key", "value"), [("scoring_func", "sigmoid"), ("topk_method", "group_limited_greedy")])
def test_unsupported_deepseek_options_name_the_key(key, value):
    hf = config_to_hf(ModelConfig.from_preset("tiny-deepseek-moe"))
    hf[key] = value
    with pytest.raises(ConfigError, match=key):
        config_from_hf(hf)


def test_unsupported_olmoe_and_mixtral_options_name_the_key():
    olmoe = config_to_hf(ModelConfig.from_preset("tiny-olmoe"))
    olmoe["clip_qkv"] = 8.0
    with pytest.raises(ConfigError, match="clip_qkv"):
        config_from_hf(olmoe)
    mixtral = config_to_hf(ModelConfig.from_preset("tiny-mixtral"))
    mixtral["router_jitter_noise"] = 0.1
    with pytest.raises(ConfigError, match="router_jitter_noise"):
        config_from_hf(mixtral)
    del mixtral["num_local_experts"]
    mixtral["router_jitter_noise"] = 0.0
    with pytest.raises(ConfigError, match="num_local_experts"):
        config_from_hf(mixtral)


def test_unexportable_config_names_the_key():
    cfg = ModelConfig.from_preset("tiny-mixtral", norm_topk_prob=False)
    with pytest.raises(ConfigError, match="norm_topk_prob"):
        config_to_hf(cfg)


@pytest.fixture
def exported(tmp_path):
    model = MoEForCausalLM(ModelConfig.from_preset("tiny-mixtral"))
    export_hf(model, tmp_path, max_shard_bytes=64 * 1024)
    (tmp_path / "moetrain_config.json").unlink()  # load through config.json, as for a Hugging Face directory
    return tmp_path


def _rewrite_tensor(model_dir, name, new):
    """Replace (or with new=None, drop) tensor ``name`` in its shard; returns the shard's file name."""
    from safetensors.torch import load_file

    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    fname = index["weight_map"][name]
    tensors = load_file(str(model_dir / fname))
    if new is None:
        del tensors[name]
        del index["weight_map"][name]
        index_path.write_text(json.dumps(index))
    else:
        tensors[name] = new
    save_file(tensors, str(model_dir / fname))
    return fname


def test_missing_tensor_is_named(exported):
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    _rewrite_tensor(exported, name, None)
    with pytest.raises(ShardError, match=rf"lacks 1 tensor.*{name}"):
        from_pretrained(exported)


def test_shape_mismatch_names_file_and_tensor(exported):
    name = "model.layers.0.self_attn.q_proj.weight"
    fname = _rewrite_tensor(exported, name, torch.zeros(8, 8))
    with pytest.raises(ShardError, match=rf"{fname}.*{name}.*\(8, 8\)"):
        from_pretrained(exported)


def test_unexpected_tensor_names_file_and_tensor(exported):
    name = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    fname = index["weight_map"][name]
    from safetensors.torch import load_file

    tensors = load_file(str(exported / fname))
    tensors["model.layers.0.mystery.weight"] = torch.zeros(2)
    save_file(tensors, str(exported / fname))
    index["weight_map"]["model.layers.0.mystery.weight"] = fname
    (exported / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=rf"{fname}.*unexpected tensor 'model.layers.0.mystery.weight'"):
        from_pretrained(exported)


def test_truncated_shard_is_named(exported):
    shard = sorted(exported.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ShardError, match=shard.name):
        from_pretrained(exported)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(ConfigError, match="nope does not exist"):
        from_pretrained(tmp_path / "nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        from_pretrained(tmp_path / "file")
    with pytest.raises(ConfigError, match="config.json"):
        from_pretrained(tmp_path)


def test_a_run_directory_loads_its_last_checkpoint(tmp_path):
    """``moetrain.from_pretrained("runs/NAME")`` takes a run directory as generate, export and init_from do: the
    checkpoint that ``checkpoints/last`` names, not an older one."""
    from moetrain.training.checkpoint import save_checkpoint

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="run directory without a complete checkpoint"):
        moetrain.from_pretrained(run)
    cfg = ModelConfig.from_preset("tiny-olmoe")
    older, newer = MoEForCausalLM(cfg), MoEForCausalLM(cfg)
    save_checkpoint(run, 2, older)
    save_checkpoint(run, 4, newer)
    loaded = moetrain.from_pretrained(run).state_dict()
    assert loaded.keys() == newer.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in newer.state_dict().items())
    assert not torch.equal(loaded["lm_head.weight"], older.state_dict()["lm_head.weight"])
    # a pointer left naming a deleted checkpoint says so
    (run / "checkpoints" / "last").write_text("step-9\n")
    with pytest.raises(ConfigError, match="names 'step-9', which is not a directory"):
        moetrain.from_pretrained(run)
