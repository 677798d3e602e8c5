""":class:`~moetrain.config.ModelConfig` -> Hugging Face ``config.json``, one writer per family.

Writing produces the key set of the family's published checkpoints (for ``deepseek_moe``: exactly
the keys, ``model_type``, ``architectures`` and ``auto_map`` of deepseek-ai/deepseek-moe-16b-base),
so an exported directory loads in transformers. transformers has no DeepSeek-MoE (v1) class: its
``auto_map`` names modelling files that must sit next to config.json, so it is written only on request
(``with_code=True``), by writers that also copy those files (:data:`REMOTE_CODE`, :mod:`moetrain.models.hf_code`).
A feature the family's format cannot express is refused with a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moetrain.config import ConfigError, ModelConfig

_ARCHITECTURES = {
    "deepseek_moe": "DeepseekForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}

# deepseek-moe-16b-base ships its modelling code with the checkpoint (transformers has no class for it).
DEEPSEEK_AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekConfig",
    "AutoModel": "modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
}

# family -> (package under moetrain.models.hf_code holding the files, the auto_map naming them), for the families
# that load in transformers only with their own modelling code (trust_remote_code=True)
REMOTE_CODE: dict[str, tuple[str, dict[str, str]]] = {
    "deepseek_moe": ("deepseek_moe", DEEPSEEK_AUTO_MAP),
}


def remote_code_files(family: str) -> list[str]:
    """The ``.py`` files that ``family``'s ``auto_map`` names (empty for families transformers ships)."""
    if family not in REMOTE_CODE:
        return []
    return sorted({ref.split(".")[0] + ".py" for ref in REMOTE_CODE[family][1].values()})


def _rope_and_common(c: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    return {
        "architectures": [_ARCHITECTURES[c.family]],
        "attention_dropout": 0.0,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "initializer_range": 0.02,
        "max_position_embeddings": c.max_position_embeddings,
        "num_attention_heads": c.num_attention_heads,
        "num_experts_per_tok": c.num_experts_per_tok,
        "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.kv_heads,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_word_embeddings,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": c.vocab_size,
    }


def _require(c: ModelConfig, ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"model.{key}={getattr(c, key)!r} cannot be written as a {c.family} config.json: {why}")


def _deepseek_to_hf(c: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    _require(c, c.aux_loss in ("seq", "token", "none"), "aux_loss", "DeepSeek has seq_aux true/false only")
    _require(c, c.qk_norm == "none", "qk_norm", "DeepSeek-MoE has no q/k norm")
    _require(c, not c.attention_bias, "attention_bias", "DeepSeek-MoE attention has no bias")
    _require(c, c.routed_scaling_factor == 1.0, "routed_scaling_factor", "DeepSeek-MoE (v1) has no routed scaling")
    _require(c, c.sliding_window is None, "sliding_window", "DeepSeek-MoE has no sliding window")
    _require(c, c.shared_expert_intermediate_size == 0, "shared_expert_intermediate_size",
             "DeepSeek shared experts are sized by num_shared_experts")
    out = _rope_and_common(c, torch_dtype)
    out.update({
        "attention_bias": False,
        "aux_loss_alpha": c.aux_loss_coef if c.aux_loss != "none" else 0.0,
        "first_k_dense_replace": c.first_k_dense_replace,
        "intermediate_size": c.intermediate_size,
        "model_type": "deepseek",
        "moe_intermediate_size": c.moe_intermediate_size,
        "moe_layer_freq": c.moe_layer_freq,
        "n_routed_experts": c.num_experts,
        "n_shared_experts": c.num_shared_experts or None,
        "norm_topk_prob": c.norm_topk_prob,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "scoring_func": "softmax",
        "seq_aux": c.aux_loss != "token",
        "transformers_version": "4.36.0",
    })
    return out


def _mla_to_hf(c: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    _require(c, c.aux_loss in ("seq", "token", "none"), "aux_loss", "DeepSeek has seq_aux true/false only")
    _require(c, not c.attention_bias, "attention_bias", "DeepSeek MLA projections have no bias")
    _require(c, c.shared_expert_intermediate_size == 0, "shared_expert_intermediate_size",
             "DeepSeek shared experts are sized by num_shared_experts")
    # transformers' DeepSeek-V2/V3 make every layer from first_k_dense_replace on an MoE layer
    _require(c, c.moe_layer_freq == 1, "moe_layer_freq", "transformers' DeepSeek-V2/V3 have no MoE layer stride")
    out = _rope_and_common(c, torch_dtype)
    out.update({
        "attention_bias": False,
        "aux_loss_alpha": c.aux_loss_coef if c.aux_loss != "none" else 0.0,
        "first_k_dense_replace": c.first_k_dense_replace,
        "intermediate_size": c.intermediate_size,
        "kv_lora_rank": c.kv_lora_rank,
        "moe_intermediate_size": c.moe_intermediate_size,
        "moe_layer_freq": c.moe_layer_freq,
        "n_group": c.n_group,
        "n_routed_experts": c.num_experts,
        "n_shared_experts": c.num_shared_experts,
        "norm_topk_prob": c.norm_topk_prob,
        "q_lora_rank": c.q_lora_rank,
        "qk_nope_head_dim": c.qk_nope_head_dim,
        "qk_rope_head_dim": c.qk_rope_head_dim,
        "rope_scaling": None if c.rope_scaling is None else dict(c.rope_scaling),
        "routed_scaling_factor": c.routed_scaling_factor,
        "scoring_func": c.scoring_func,
        "seq_aux": c.aux_loss != "token",
        "topk_group": c.topk_group,
        "topk_method": c.topk_method,
        "v_head_dim": c.v_head_dim,
    })
    return out


def _deepseek_v2_to_hf(c: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    _require(c, c.scoring_func == "softmax", "scoring_func", "DeepSeek-V2 scores experts with softmax")
    _require(c, c.topk_method in ("greedy", "group_limited_greedy"), "topk_method",
             "DeepSeek-V2 routes with greedy or group_limited_greedy")
    _require(c, not c.norm_topk_prob, "norm_topk_prob", "transformers' DeepSeek-V2 never renormalises")
    _require(c, c.rope_interleave, "rope_interleave", "DeepSeek-V2 rotary dims are interleaved")
    out = _mla_to_hf(c, torch_dtype)
    out.update({"model_type": "deepseek_v2", "transformers_version": "4.39.3"})
    return out


def _deepseek_v3_to_hf(c: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    _require(c, c.scoring_func == "sigmoid", "scoring_func", "DeepSeek-V3 scores experts with sigmoid")
    _require(c, c.topk_method == "noaux_tc", "topk_method", "DeepSeek-V3 routes with noaux_tc")
    out = _mla_to_hf(c, torch_dtype)
    # no multi-token-prediction modules are trained or written
    out.update({"model_type": "deepseek_v3", "num_nextn_predict_layers": 0, "rope_interleave": c.rope_interleave,
                "transformers_version": "4.33.1"})
    return out


def _switch_coef(c: ModelConfig) -> float:
    _require(c, c.aux_loss in ("switch", "none"), "aux_loss", "this family uses the switch balance loss")
    return c.aux_loss_coef if c.aux_loss == "switch" else 0.0


def _qwen_common_to_hf(c: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    _require(c, c.num_shared_experts == 0, "num_shared_experts", "use shared_expert_intermediate_size")
    _require(c, c.routed_scaling_factor == 1.0, "routed_scaling_factor", "Qwen has no routed scaling")
    _require(c, c.sliding_window is None, "sliding_window", "Qwen's per-layer sliding window is not supported")
    out = _rope_and_common(c, torch_dtype)
    out.update({
        "decoder_sparse_step": c.decoder_sparse_step,
        "intermediate_size": c.intermediate_size,
        "max_window_layers": c.num_hidden_layers,
        "mlp_only_layers": list(c.mlp_only_layers),
        "moe_intermediate_size": c.moe_intermediate_size,
        "norm_topk_prob": c.norm_topk_prob,
        "num_experts": c.num_experts,
        "output_router_logits": False,
        "router_aux_loss_coef": _switch_coef(c),
        "sliding_window": None,
        "use_sliding_window": False,
    })
    return out


def _qwen2_moe_to_hf(c: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    _require(c, c.qk_norm == "none", "qk_norm", "Qwen2-MoE has no q/k norm")
    _require(c, c.attention_bias, "attention_bias", "Qwen2-MoE always has q/k/v biases")
    _require(c, c.shared_expert_intermediate_size > 0 and c.shared_expert_gate, "shared_expert_gate",
             "Qwen2-MoE always has a gated shared expert")
    out = _qwen_common_to_hf(c, torch_dtype)
    out.update({"model_type": "qwen2_moe", "qkv_bias": True,
                "shared_expert_intermediate_size": c.shared_expert_intermediate_size,
                "transformers_version": "4.40.0"})
    return out


def _qwen3_moe_to_hf(c: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    _require(c, c.qk_norm == "head", "qk_norm", "Qwen3-MoE normalises q and k per head")
    _require(c, c.shared_expert_intermediate_size == 0, "shared_expert_intermediate_size",
             "Qwen3-MoE has no shared expert")
    out = _qwen_common_to_hf(c, torch_dtype)
    out.update({"model_type": "qwen3_moe", "attention_bias": c.attention_bias, "head_dim": c.attn_head_dim,
                "rope_scaling": None, "transformers_version": "4.51.0"})
    return out


def _no_shared(c: ModelConfig) -> None:
    _require(c, c.num_shared_experts == 0, "num_shared_experts", "the family has no shared experts")
    _require(c, c.shared_expert_intermediate_size == 0, "shared_expert_intermediate_size",
             "the family has no shared experts")
    _require(c, c.routed_scaling_factor == 1.0, "routed_scaling_factor", "the family has no routed scaling")
    _require(c, not c.attention_bias, "attention_bias", "the family has no attention bias")
    _require(c, not c.mlp_only_layers and c.first_k_dense_replace == 0 and c.decoder_sparse_step == 1
             and c.moe_layer_freq == 1, "first_k_dense_replace", "every layer of this family is an MoE layer")


def _mixtral_to_hf(c: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    _no_shared(c)
    _require(c, c.qk_norm == "none", "qk_norm", "Mixtral has no q/k norm")
    _require(c, c.norm_topk_prob, "norm_topk_prob", "Mixtral always renormalises the top-k weights")
    out = _rope_and_common(c, torch_dtype)
    out.update({
        "head_dim": c.head_dim,
        "intermediate_size": c.moe_intermediate_size,
        "model_type": "mixtral",
        "num_local_experts": c.num_experts,
        "output_router_logits": False,
        "router_aux_loss_coef": _switch_coef(c),
        "router_jitter_noise": 0.0,
        "sliding_window": c.sliding_window,
        "transformers_version": "4.36.0",
    })
    if c.head_dim is None:
        del out["head_dim"]
    return out


def _olmoe_to_hf(c: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    _no_shared(c)
    _require(c, c.qk_norm == "full", "qk_norm", "OLMoE normalises the full q and k projections")
    _require(c, c.sliding_window is None, "sliding_window", "OLMoE has no sliding window")
    _require(c, c.head_dim is None, "head_dim", "OLMoE's head dim is hidden_size / num_attention_heads")
    out = _rope_and_common(c, torch_dtype)
    out.update({
        "attention_bias": False,
        "clip_qkv": None,
        "intermediate_size": c.moe_intermediate_size,
        "model_type": "olmoe",
        "norm_topk_prob": c.norm_topk_prob,
        "num_experts": c.num_experts,
        "output_router_logits": False,
        "pad_token_id": c.pad_token_id,
        "rope_scaling": None,
        "router_aux_loss_coef": _switch_coef(c),
        "transformers_version": "4.43.0",
    })
    return out


_WRITERS: dict[str, Callable[[ModelConfig, str], dict[str, Any]]] = {
    "deepseek_moe": _deepseek_to_hf,
    "deepseek_v2": _deepseek_v2_to_hf,
    "deepseek_v3": _deepseek_v3_to_hf,
    "qwen2_moe": _qwen2_moe_to_hf,
    "qwen3_moe": _qwen3_moe_to_hf,
    "mixtral": _mixtral_to_hf,
    "olmoe": _olmoe_to_hf,
}


def config_to_hf(config: ModelConfig, torch_dtype: str = "bfloat16", *, with_code: bool = False) -> dict[str, Any]:
    """The family's ``config.json`` for ``config`` (keys sorted, as transformers writes them).

    Args:
        with_code: add the ``auto_map`` naming the family's modelling files (:data:`REMOTE_CODE`); only a
            writer that puts those files next to config.json may ask for it, since transformers fails on an
            auto_map naming files that are not there. No effect for families transformers ships.

    Raises:
        ConfigError: the config uses a feature the family's format cannot express (names the key).
    """
    # Fields no family's config.json can hold (router_z_loss_coef, name) travel in moetrain_config.json.
    out = _WRITERS[config.family](config, torch_dtype)
    if with_code and config.family in REMOTE_CODE:
        out["auto_map"] = dict(REMOTE_CODE[config.family][1])
    return dict(sorted(out.items()))
