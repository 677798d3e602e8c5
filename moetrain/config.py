"""The model configuration: one validated, serializable dataclass for every supported MoE family.

Presets live as YAML under ``configs/models/``; :func:`ModelConfig.from_preset` loads them. The same
dataclass is written into every checkpoint (``moetrain_config.json``) so that a checkpoint alone
rebuilds its model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_args

import yaml

Family = Literal["deepseek_moe", "deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe"]
FAMILIES: tuple[str, ...] = get_args(Family)
DEEPSEEK_FAMILIES: tuple[str, ...] = ("deepseek_moe", "deepseek_v2", "deepseek_v3")
"""Families with DeepSeek's MoE layout: shared experts sized by num_shared_experts, first_k_dense_replace."""
MLA_FAMILIES: tuple[str, ...] = ("deepseek_v2", "deepseek_v3")
"""Families with multi-head latent attention (see :mod:`moetrain.models.mla`)."""
YARN_KEYS = frozenset({"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                       "mscale", "mscale_all_dim", "attention_factor", "truncate"})
AuxLossKind = Literal["switch", "seq", "token", "none"]
ScoringFunc = Literal["softmax", "sigmoid"]
TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]
QkNorm = Literal["none", "head", "full"]
SCORING_FUNCS: tuple[str, ...] = get_args(ScoringFunc)
TOPK_METHODS: tuple[str, ...] = get_args(TopkMethod)

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent; the message names the key."""


@dataclass
class ModelConfig:
    """Shape and routing of a decoder-only MoE language model.

    Field names follow Hugging Face where the families agree; family-specific knobs say which
    family uses them.
    """

    family: Family = "deepseek_moe"
    """One of deepseek_moe, deepseek_v2, deepseek_v3, qwen2_moe, qwen3_moe, mixtral, olmoe (checked in validate: a
    dataclass does not enforce its Literal types)."""
    name: str = "custom"
    """A label for logs and checkpoints."""
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 512
    """Width of the dense MLP of non-MoE layers."""
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: Optional[int] = None
    """Defaults to num_attention_heads (no grouped-query attention)."""
    head_dim: Optional[int] = None
    """Defaults to hidden_size // num_attention_heads (qwen3_moe sets it independently)."""
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Bias on q/k/v projections (qwen2_moe)."""
    qk_norm: QkNorm = "none"
    """RMSNorm on queries and keys: per head (qwen3_moe) or over the full projection (olmoe)."""
    sliding_window: Optional[int] = None
    """Attend to at most this many previous positions (mixtral, when set)."""

    # ---- experts and routing
    num_experts: int = 8
    """Routed experts per MoE layer (n_routed_experts / num_local_experts)."""
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256
    """Width of one routed expert."""
    num_shared_experts: int = 0
    """DeepSeek shared experts: one dense MLP of width moe_intermediate_size * num_shared_experts."""
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE shared expert width (0: none)."""
    shared_expert_gate: bool = False
    """Qwen2-MoE: scale the shared expert's output by sigmoid(Linear(hidden, 1))."""
    norm_topk_prob: bool = False
    """Renormalise the top-k routing weights to sum to one."""
    routed_scaling_factor: float = 1.0
    scoring_func: ScoringFunc = "softmax"
    """Router scores: softmax over experts, or an independent sigmoid per expert (deepseek_v3)."""
    topk_method: TopkMethod = "greedy"
    """greedy top-k; group_limited_greedy (DeepSeek-V2: keep the topk_group groups with the best expert, then
    top-k inside them); noaux_tc (DeepSeek-V3: groups ranked by the sum of their two best biased scores, experts
    picked by score + e_score_correction_bias, weights from the unbiased scores)."""
    n_group: int = 1
    """Expert groups for group-limited routing (DeepSeek: one group per device of the original deployment)."""
    topk_group: int = 1
    """Groups a token may route into (group-limited routing)."""
    bias_update_speed: float = 0.0
    """noaux_tc: how far each expert's e_score_correction_bias moves per optimizer step toward balance
    (DeepSeek-V3's gamma, 0.001 in pre-training); 0 freezes the bias (the safe default for fine-tuning)."""

    # ---- multi-head latent attention (deepseek_v2, deepseek_v3)
    kv_lora_rank: int = 0
    """Width of the compressed key/value latent; 0 for the families without MLA."""
    q_lora_rank: Optional[int] = None
    """Width of the compressed query latent; None projects queries directly (DeepSeek-V2-Lite)."""
    qk_nope_head_dim: int = 0
    """Per-head query/key dims without rotary embedding."""
    qk_rope_head_dim: int = 0
    """Per-head query/key dims with rotary embedding (the key's rotary part is shared by all heads)."""
    v_head_dim: int = 0
    """Per-head value dims."""
    rope_interleave: bool = True
    """The rotary dims are laid out in interleaved pairs (x0, x1), (x2, x3), ... as DeepSeek's weights are."""
    rope_scaling: Optional[dict[str, Any]] = None
    """YaRN as the DeepSeek configs write it: {type: yarn, factor, original_max_position_embeddings, beta_fast,
    beta_slow, mscale, mscale_all_dim}; None for plain rotary embeddings. Only the MLA families take it."""

    # ---- which layers are MoE
    first_k_dense_replace: int = 0
    """DeepSeek: the first k layers use a dense MLP."""
    moe_layer_freq: int = 1
    """DeepSeek: layers i >= first_k_dense_replace with i % moe_layer_freq == 0 are MoE."""
    decoder_sparse_step: int = 1
    """Qwen: layer i is MoE when (i + 1) % decoder_sparse_step == 0 ..."""
    mlp_only_layers: list[int] = field(default_factory=list)
    """... and i is not listed here."""

    # ---- auxiliary losses
    aux_loss: AuxLossKind = "switch"
    """switch (Mixtral/Qwen/OLMoE load-balancing loss), seq or token (DeepSeek), none."""
    aux_loss_coef: float = 0.01
    """Coefficient of the balance loss (router_aux_loss_coef / aux_loss_alpha)."""
    router_z_loss_coef: float = 0.0
    """Coefficient of the router z-loss (mean squared logsumexp of router logits); 0 disables it."""

    # ---- special tokens (informational; used by data and generation)
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived shape
    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def is_mla(self) -> bool:
        """Whether attention is multi-head latent attention (deepseek_v2, deepseek_v3)."""
        return self.family in MLA_FAMILIES

    @property
    def rotary_dim(self) -> int:
        """Dims per head that carry rotary embeddings."""
        return self.qk_rope_head_dim if self.is_mla else self.attn_head_dim

    @property
    def shared_width(self) -> int:
        """Width of the shared-expert MLP (0 when the family has none)."""
        if self.family in DEEPSEEK_FAMILIES:
            return self.moe_intermediate_size * self.num_shared_experts
        return self.shared_expert_intermediate_size

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` has a routed MoE block (else a dense MLP)."""
        if self.family in DEEPSEEK_FAMILIES:
            return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0
        if self.family in ("qwen2_moe", "qwen3_moe"):
            return layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0
        return True

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def _mla_params(self) -> int:
        """Parameters of one multi-head latent attention layer (projections and the two latent norms)."""
        h, nh, r = self.hidden_size, self.num_attention_heads, self.kv_lora_rank
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        q = h * nh * qk if self.q_lora_rank is None else h * self.q_lora_rank + self.q_lora_rank * (1 + nh * qk)
        kv = h * (r + self.qk_rope_head_dim) + r + r * nh * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + nh * self.v_head_dim * h

    def param_counts(self) -> dict[str, int]:
        """Parameters by kind: ``expert`` (routed experts), ``dense`` (everything else), ``total``."""
        h, hd = self.hidden_size, self.attn_head_dim
        if self.is_mla:
            attn = self._mla_params()
        else:
            attn = h * hd * (self.num_attention_heads * 2 + self.kv_heads * 2)
        if self.attention_bias:
            attn += hd * (self.num_attention_heads + 2 * self.kv_heads)
        if self.qk_norm == "head":
            attn += 2 * hd
        elif self.qk_norm == "full":
            attn += hd * (self.num_attention_heads + self.kv_heads)
        expert_one = 3 * h * self.moe_intermediate_size
        n_moe = len(self.moe_layers)
        n_dense = self.num_hidden_layers - n_moe
        shared = 3 * h * self.shared_width + (h if self.shared_expert_gate else 0)
        dense = (
            self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
            + h
            + self.num_hidden_layers * (attn + 2 * h)
            + n_dense * 3 * h * self.intermediate_size
            + n_moe * (shared + h * self.num_experts)
        )
        expert = n_moe * self.num_experts * expert_one
        return {"expert": expert, "dense": dense, "total": expert + dense}

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first inconsistent key."""
        if self.family not in FAMILIES:
            raise ConfigError(f"model.family={self.family!r} is not supported; choose one of {', '.join(FAMILIES)}")
        if self.aux_loss not in get_args(AuxLossKind):
            raise ConfigError(f"model.aux_loss={self.aux_loss!r}: choose switch, seq, token or none")
        if self.qk_norm not in get_args(QkNorm):
            raise ConfigError(f"model.qk_norm={self.qk_norm!r}: choose none, head or full")
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
                    "num_experts_per_tok", "moe_intermediate_size", "moe_layer_freq", "decoder_sparse_step"]
        for key in positive:
            if int(getattr(self, key)) <= 0:
                raise ConfigError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"model.num_experts_per_tok={self.num_experts_per_tok} exceeds "
                              f"model.num_experts={self.num_experts}")
        self._validate_routing()
        if self.is_mla:
            self._validate_mla()
            return
        for key in ("kv_lora_rank", "rope_scaling"):
            if getattr(self, key):
                raise ConfigError(f"model.{key}={getattr(self, key)!r}: only the {' and '.join(MLA_FAMILIES)} families "
                                  f"take it; model.family is {self.family!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by "
                              f"model.num_attention_heads={self.num_attention_heads}; set model.head_dim")
        if self.num_attention_heads % self.kv_heads:
            raise ConfigError(f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"model.num_key_value_heads={self.kv_heads}")
        if self.attn_head_dim % 2:
            raise ConfigError(f"the attention head dimension ({self.attn_head_dim}) must be even for rotary embeddings")

    def _validate_routing(self) -> None:
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"model.scoring_func={self.scoring_func!r}: choose one of {', '.join(SCORING_FUNCS)}")
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(f"model.topk_method={self.topk_method!r}: choose one of {', '.join(TOPK_METHODS)}")
        if self.family not in MLA_FAMILIES:
            for key, plain in (("scoring_func", "softmax"), ("topk_method", "greedy")):
                if getattr(self, key) != plain:
                    raise ConfigError(f"model.{key}={getattr(self, key)!r}: the {self.family} family routes with "
                                      f"{key} {plain!r}; only {' and '.join(MLA_FAMILIES)} take other values")
        if self.n_group <= 0 or self.num_experts % self.n_group:
            raise ConfigError(f"model.n_group={self.n_group} must be positive and divide "
                              f"model.num_experts={self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"model.topk_group={self.topk_group} must be between 1 and model.n_group={self.n_group}")
        per_group = self.num_experts // self.n_group
        if self.topk_method != "greedy" and self.topk_group * per_group < self.num_experts_per_tok:
            raise ConfigError(f"model.topk_group={self.topk_group} groups of {per_group} experts "
                              f"hold fewer than model.num_experts_per_tok={self.num_experts_per_tok} experts")
        if self.topk_method == "noaux_tc" and per_group < 2:
            raise ConfigError(f"model.n_group={self.n_group}: noaux_tc ranks groups by their two best experts, so each "
                              "group needs at least 2 experts")
        if self.bias_update_speed < 0:
            raise ConfigError(f"model.bias_update_speed={self.bias_update_speed} must be >= 0 (0 freezes the bias)")
        if self.bias_update_speed > 0 and self.topk_method != "noaux_tc":
            raise ConfigError(f"model.bias_update_speed={self.bias_update_speed}: only topk_method 'noaux_tc' has an "
                              f"e_score_correction_bias to update (model.topk_method is {self.topk_method!r})")

    def _validate_mla(self) -> None:
        for key in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            if int(getattr(self, key)) <= 0:
                raise ConfigError(f"model.{key} must be positive for the {self.family} family, "
                                  f"got {getattr(self, key)}")
        if self.qk_nope_head_dim < 0:
            raise ConfigError(f"model.qk_nope_head_dim must be >= 0, got {self.qk_nope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"model.q_lora_rank must be positive or null, got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even for rotary embeddings")
        if self.kv_heads != self.num_attention_heads:
            raise ConfigError(f"model.num_key_value_heads={self.num_key_value_heads}: multi-head latent attention "
                              f"expands the latent into all {self.num_attention_heads} heads; set it to null or to "
                              "model.num_attention_heads")
        for key in ("head_dim", "sliding_window"):
            if getattr(self, key) is not None:
                raise ConfigError(f"model.{key}={getattr(self, key)!r}: the {self.family} family sizes heads with "
                                  "qk_nope_head_dim/qk_rope_head_dim/v_head_dim and has no sliding window; set it to "
                                  "null")
        if self.qk_norm != "none":
            raise ConfigError(f"model.qk_norm={self.qk_norm!r}: multi-head latent attention normalises the latents, "
                              "not q and k; set it to none")
        if self.rope_scaling is not None:
            self._validate_yarn(self.rope_scaling)

    def _validate_yarn(self, scaling: dict[str, Any]) -> None:
        if not isinstance(scaling, dict):
            raise ConfigError(f"model.rope_scaling={scaling!r} must be a mapping or null")
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind != "yarn":
            raise ConfigError(f"model.rope_scaling.type={kind!r}: only 'yarn' rope scaling is implemented")
        unknown = sorted(set(scaling) - YARN_KEYS)
        if unknown:
            raise ConfigError(f"model.rope_scaling: unknown key(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(YARN_KEYS))}")
        if not scaling.get("original_max_position_embeddings"):
            raise ConfigError("model.rope_scaling.original_max_position_embeddings is required for yarn")
        factor = scaling.get("factor")
        if factor is not None and float(factor) <= 0:
            raise ConfigError(f"model.rope_scaling.factor={factor} must be positive")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model key(s) {', '.join(unknown)}; "
                              f"known keys: {', '.join(sorted(known))}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: model config not found") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_preset(cls, name_or_path: str | Path, **overrides: Any) -> ModelConfig:
        """Load ``configs/models/<name>.yaml`` (or a YAML path) and apply keyword overrides."""
        path = Path(name_or_path)
        # a preset name may contain dots (qwen2-moe-a2.7b): only a .yaml/.yml suffix or a folder makes a path
        if path.suffix not in (".yaml", ".yml") and len(path.parts) == 1:
            path = CONFIGS_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            presets = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
            raise ConfigError(f"model preset {str(name_or_path)!r} not found ({path}); available: {presets}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        data.update(overrides)
        return cls.from_dict(data, source=str(path))
