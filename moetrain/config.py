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
from typing import Any, Literal, Optional

import yaml

Family = Literal["deepseek_moe", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe"]
FAMILIES: tuple[str, ...] = ("deepseek_moe", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe")
AuxLossKind = Literal["switch", "seq", "token", "none"]

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent; the message names the key."""


@dataclass
class ModelConfig:
    """Shape and routing of a decoder-only MoE language model.

    Field names follow Hugging Face where the families agree; family-specific knobs say which
    family uses them.
    """

    family: str = "deepseek_moe"
    """One of deepseek_moe, qwen2_moe, qwen3_moe, mixtral, olmoe."""
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
    qk_norm: Literal["none", "head", "full"] = "none"
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
    aux_loss: str = "switch"
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
    def shared_width(self) -> int:
        """Width of the shared-expert MLP (0 when the family has none)."""
        if self.family == "deepseek_moe":
            return self.moe_intermediate_size * self.num_shared_experts
        return self.shared_expert_intermediate_size

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` has a routed MoE block (else a dense MLP)."""
        if self.family == "deepseek_moe":
            return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0
        if self.family in ("qwen2_moe", "qwen3_moe"):
            return layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0
        return True

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def param_counts(self) -> dict[str, int]:
        """Parameters by kind: ``expert`` (routed experts), ``dense`` (everything else), ``total``."""
        h, hd = self.hidden_size, self.attn_head_dim
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
        if self.aux_loss not in ("switch", "seq", "token", "none"):
            raise ConfigError(f"model.aux_loss={self.aux_loss!r}: choose switch, seq, token or none")
        if self.qk_norm not in ("none", "head", "full"):
            raise ConfigError(f"model.qk_norm={self.qk_norm!r}: choose none, head or full")
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
                    "num_experts_per_tok", "moe_intermediate_size", "moe_layer_freq", "decoder_sparse_step"]
        for key in positive:
            if int(getattr(self, key)) <= 0:
                raise ConfigError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"model.num_experts_per_tok={self.num_experts_per_tok} exceeds "
                              f"model.num_experts={self.num_experts}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by "
                              f"model.num_attention_heads={self.num_attention_heads}; set model.head_dim")
        if self.num_attention_heads % self.kv_heads:
            raise ConfigError(f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"model.num_key_value_heads={self.kv_heads}")
        if self.attn_head_dim % 2:
            raise ConfigError(f"the attention head dimension ({self.attn_head_dim}) must be even for rotary embeddings")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: model config not found") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_preset(cls, name_or_path: str | Path, **overrides: Any) -> "ModelConfig":
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
