"""Hugging Face ``config.json`` -> :class:`~moetrain.config.ModelConfig`, one reader per family.

Reading accepts both the transformers-4 spelling (``rope_theta``, ``rope_scaling``) and the
transformers-5 spelling (``rope_parameters``, ``num_local_experts`` for Qwen3-MoE). DeepSeek-V2/V3
(``deepseek_v2``/``deepseek_v3``) bring YaRN rope scaling, MLA shapes and their routers. Options that
moetrain does not implement (rope scaling outside DeepSeek-V2/V3, non-softmax scoring in the others,
qkv clipping, Qwen's per-layer sliding window, router jitter, ...) are refused with a
:class:`ConfigError` naming the key, rather than silently producing a different model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from moetrain.config import ConfigError, ModelConfig

# model_type in config.json -> moetrain family
HF_MODEL_TYPES: dict[str, str] = {
    "deepseek": "deepseek_moe",
    "deepseek_v2": "deepseek_v2",
    "deepseek_v3": "deepseek_v3",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "olmoe": "olmoe",
}


def _where(source: str, key: str) -> str:
    return f"{source}: key {key!r}"


def _get(cfg: dict[str, Any], key: str, source: str, default: Any = ...) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is ...:
        raise ConfigError(f"{_where(source, key)} is missing; a {cfg.get('model_type')} config.json needs it")
    return default


def _experts(cfg: dict[str, Any], source: str, *keys: str) -> int:
    """The routed expert count, under whichever of ``keys`` this config spells it."""
    for key in keys:
        if cfg.get(key) is not None:
            return int(cfg[key])
    raise ConfigError(f"{source}: none of the keys {', '.join(map(repr, keys))} is set; cannot tell the expert count")


def _rope_theta(cfg: dict[str, Any], source: str) -> float:
    """rope_theta from either spelling; any rope scaling is refused."""
    scaling = cfg.get("rope_scaling")
    if scaling:
        raise ConfigError(f"{_where(source, 'rope_scaling')} = {scaling!r}: rope scaling is not supported; only "
                          "plain rotary embeddings (rope_scaling null) load")
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{_where(source, 'rope_parameters.rope_type')} = {rope_type!r}: only 'default' "
                              "rotary embeddings are supported")
        if params.get("rope_theta") is not None:
            return float(params["rope_theta"])
    return float(cfg.get("rope_theta", 10000.0))


def _refuse(cfg: dict[str, Any], source: str, key: str, allowed: Callable[[Any], bool], why: str) -> None:
    if key in cfg and not allowed(cfg[key]):
        raise ConfigError(f"{_where(source, key)} = {cfg[key]!r}: {why}")


def _check_common(cfg: dict[str, Any], source: str) -> None:
    _refuse(cfg, source, "hidden_act", lambda v: v == "silu", "only SwiGLU experts (hidden_act 'silu') are supported")
    _refuse(cfg, source, "attention_dropout", lambda v: not v, "attention dropout is not implemented; set it to 0.0")
    _refuse(cfg, source, "mlp_bias", lambda v: not v, "MLP biases are not supported")
    _refuse(cfg, source, "pretraining_tp", lambda v: v in (None, 1), "tensor-parallel slicing of projections is not "
            "supported; set it to 1")
    if cfg.get("quantization_config"):
        raise ConfigError(f"{_where(source, 'quantization_config')}: quantized checkpoints are not supported; load a "
                          "bf16/fp32 checkpoint")


def _common(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """Fields every family spells the same way."""
    _check_common(cfg, source)
    return dict(
        vocab_size=int(_get(cfg, "vocab_size", source)),
        hidden_size=int(_get(cfg, "hidden_size", source)),
        num_hidden_layers=int(_get(cfg, "num_hidden_layers", source)),
        num_attention_heads=int(_get(cfg, "num_attention_heads", source)),
        num_key_value_heads=cfg.get("num_key_value_heads"),
        head_dim=cfg.get("head_dim"),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope_theta=_rope_theta(cfg, source),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        num_experts_per_tok=int(_get(cfg, "num_experts_per_tok", source)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
    )


def _deepseek_from_hf(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    _refuse(cfg, source, "scoring_func", lambda v: v == "softmax", "only softmax router scoring is supported")
    _refuse(cfg, source, "attention_bias", lambda v: not v, "DeepSeek-MoE attention has no bias")
    _refuse(cfg, source, "topk_method", lambda v: v in (None, "greedy"), "only greedy top-k routing is supported")
    seq_aux = bool(cfg.get("seq_aux", True))
    return dict(
        _common(cfg, source),
        family="deepseek_moe",
        intermediate_size=int(_get(cfg, "intermediate_size", source)),
        num_experts=_experts(cfg, source, "n_routed_experts"),
        moe_intermediate_size=int(_get(cfg, "moe_intermediate_size", source)),
        num_shared_experts=int(cfg.get("n_shared_experts") or 0),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        first_k_dense_replace=int(cfg.get("first_k_dense_replace", 0)),
        moe_layer_freq=int(cfg.get("moe_layer_freq", 1)),
        aux_loss="seq" if seq_aux else "token",
        aux_loss_coef=float(cfg.get("aux_loss_alpha", 0.001)),
    )


_ROPE_KEYS = ("rope_scaling", "rope_parameters", "rope_theta")


def _mla_rope(cfg: dict[str, Any], source: str) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, YaRN scaling or None) from ``rope_scaling`` (DeepSeek's and transformers-4's spelling) or
    ``rope_parameters`` (transformers-5's). The scaling is kept in DeepSeek's spelling: ``type: yarn``."""
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    scaling = cfg.get("rope_scaling") or params
    theta = float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    kind = scaling.get("type", scaling.get("rope_type", "default")) if scaling else "default"
    if kind == "default":
        return theta, None
    if kind != "yarn":
        key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
        raise ConfigError(f"{_where(source, key)}: rope type {kind!r} is not supported; DeepSeek models use 'yarn'")
    out = {"type": "yarn"}
    out.update({k: v for k, v in scaling.items() if k not in ("type", "rope_type", "rope_theta") and v is not None})
    return theta, out


def _mla_from_hf(cfg: dict[str, Any], source: str, family: str) -> dict[str, Any]:
    """Fields shared by deepseek_v2 and deepseek_v3: MLA shapes, YaRN, DeepSeek's MoE layout and balance loss."""
    _refuse(cfg, source, "attention_bias", lambda v: not v, "DeepSeek MLA projections have no bias")
    heads = int(_get(cfg, "num_attention_heads", source))
    _refuse(cfg, source, "num_key_value_heads", lambda v: v in (None, heads), "multi-head latent attention expands "
            "the latent into every head; num_key_value_heads must equal num_attention_heads")
    theta, scaling = _mla_rope(cfg, source)
    # config.json's head_dim is transformers' alias for qk_rope_head_dim; MLA sizes heads by the three dims below
    plain = {k: v for k, v in cfg.items() if k not in _ROPE_KEYS and k != "head_dim"}
    seq_aux = bool(cfg.get("seq_aux", True))
    return dict(
        _common({**plain, "rope_theta": theta}, source),
        family=family,
        intermediate_size=int(_get(cfg, "intermediate_size", source)),
        num_experts=_experts(cfg, source, "n_routed_experts", "num_local_experts"),
        moe_intermediate_size=int(_get(cfg, "moe_intermediate_size", source)),
        num_shared_experts=int(cfg.get("n_shared_experts") or 0),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        first_k_dense_replace=int(cfg.get("first_k_dense_replace", 0)),
        moe_layer_freq=int(cfg.get("moe_layer_freq", 1)),
        n_group=int(cfg.get("n_group") or 1),
        topk_group=int(cfg.get("topk_group") or 1),
        kv_lora_rank=int(_get(cfg, "kv_lora_rank", source)),
        q_lora_rank=None if cfg.get("q_lora_rank") is None else int(cfg["q_lora_rank"]),
        qk_nope_head_dim=int(_get(cfg, "qk_nope_head_dim", source)),
        qk_rope_head_dim=int(_get(cfg, "qk_rope_head_dim", source)),
        v_head_dim=int(_get(cfg, "v_head_dim", source)),
        rope_scaling=scaling,
        aux_loss="seq" if seq_aux else "token",
        aux_loss_coef=float(cfg.get("aux_loss_alpha", 0.001)),
    )


def _deepseek_v2_from_hf(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    _refuse(cfg, source, "scoring_func", lambda v: v == "softmax", "DeepSeek-V2 scores experts with softmax")
    _refuse(cfg, source, "topk_method", lambda v: v in (None, "greedy", "group_limited_greedy"),
            "DeepSeek-V2 routes with greedy or group_limited_greedy")
    # DeepSeek's V2 code skips routed_scaling_factor when it renormalises; transformers ignores the flag: the two
    # disagree, and no published V2 sets it.
    _refuse(cfg, source, "norm_topk_prob", lambda v: not v, "renormalised DeepSeek-V2 routing is not supported")
    _refuse(cfg, source, "rope_interleave", lambda v: v in (None, True), "DeepSeek-V2 rotary dims are interleaved")
    return dict(_mla_from_hf(cfg, source, "deepseek_v2"), topk_method=cfg.get("topk_method") or "greedy",
                norm_topk_prob=False, rope_interleave=True)


def _deepseek_v3_from_hf(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    _refuse(cfg, source, "scoring_func", lambda v: v == "sigmoid", "DeepSeek-V3 scores experts with sigmoid")
    _refuse(cfg, source, "topk_method", lambda v: v in (None, "noaux_tc"), "DeepSeek-V3 routes with noaux_tc")
    return dict(_mla_from_hf(cfg, source, "deepseek_v3"), scoring_func="sigmoid", topk_method="noaux_tc",
                norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
                rope_interleave=bool(cfg.get("rope_interleave", True)))


def _qwen_common(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    _refuse(cfg, source, "use_sliding_window", lambda v: not v, "Qwen's per-layer sliding window is not supported")
    return dict(
        _common(cfg, source),
        intermediate_size=int(_get(cfg, "intermediate_size", source)),
        num_experts=_experts(cfg, source, "num_experts", "num_local_experts"),
        moe_intermediate_size=int(_get(cfg, "moe_intermediate_size", source)),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        decoder_sparse_step=int(cfg.get("decoder_sparse_step", 1)),
        mlp_only_layers=[int(i) for i in cfg.get("mlp_only_layers") or []],
        aux_loss="switch",
        aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.001)),
    )


def _qwen2_moe_from_hf(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    # transformers-4 Qwen2-MoE always had q/k/v biases; transformers-5 spells the switch qkv_bias.
    return dict(
        _qwen_common(cfg, source),
        family="qwen2_moe",
        attention_bias=bool(cfg.get("qkv_bias", True)),
        shared_expert_intermediate_size=int(_get(cfg, "shared_expert_intermediate_size", source)),
        shared_expert_gate=True,
    )


def _qwen3_moe_from_hf(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    return dict(
        _qwen_common(cfg, source),
        family="qwen3_moe",
        attention_bias=bool(cfg.get("attention_bias", False)),
        qk_norm="head",
    )


def _mixtral_from_hf(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    _refuse(cfg, source, "router_jitter_noise", lambda v: not v, "router jitter is not implemented; set it to 0.0")
    width = int(_get(cfg, "intermediate_size", source))
    return dict(
        _common(cfg, source),
        family="mixtral",
        intermediate_size=width,  # Mixtral has no dense MLP; keep the field meaningful anyway
        num_experts=_experts(cfg, source, "num_local_experts", "num_experts"),
        moe_intermediate_size=width,
        norm_topk_prob=True,  # MixtralTopKRouter always renormalises the top-k weights
        sliding_window=cfg.get("sliding_window"),
        aux_loss="switch",
        aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.02)),
    )


def _olmoe_from_hf(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    _refuse(cfg, source, "clip_qkv", lambda v: v is None, "clipping q/k/v activations is not implemented")
    _refuse(cfg, source, "attention_bias", lambda v: not v, "OLMoE attention biases are not supported")
    width = int(_get(cfg, "intermediate_size", source))
    return dict(
        _common(cfg, source),
        family="olmoe",
        intermediate_size=width,
        num_experts=_experts(cfg, source, "num_experts", "num_local_experts"),
        moe_intermediate_size=width,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        qk_norm="full",
        aux_loss="switch",
        aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.01)),
    )


_READERS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "deepseek_moe": _deepseek_from_hf,
    "deepseek_v2": _deepseek_v2_from_hf,
    "deepseek_v3": _deepseek_v3_from_hf,
    "qwen2_moe": _qwen2_moe_from_hf,
    "qwen3_moe": _qwen3_moe_from_hf,
    "mixtral": _mixtral_from_hf,
    "olmoe": _olmoe_from_hf,
}


def config_from_hf(hf_config: dict[str, Any], source: str = "config.json", name: Optional[str] = None) -> ModelConfig:
    """Build a :class:`ModelConfig` from a Hugging Face ``config.json`` dict.

    Args:
        hf_config: the parsed config.json.
        source: where it came from, for error messages.
        name: label for the config (defaults to ``_name_or_path`` or the model type).

    Raises:
        ConfigError: unknown ``model_type`` or an option moetrain does not implement (names the key).
    """
    model_type = hf_config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ConfigError(f"{_where(source, 'model_type')} = {model_type!r} is not supported; supported model "
                          f"types: {', '.join(sorted(HF_MODEL_TYPES))}")
    family = HF_MODEL_TYPES[model_type]
    fields = _READERS[family](hf_config, source)
    fields["name"] = name or str(hf_config.get("_name_or_path") or model_type)
    try:
        return ModelConfig(**fields)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
