"""Rotary tables for every family, and YaRN (the long-context rope scaling of DeepSeek-V2 and V3).

YaRN changes three things, all computed here from ``ModelConfig.rope_scaling``:

* the inverse frequencies: low frequencies (long wavelengths) are interpolated by ``factor``, high ones
  kept, with a linear ramp in between (:func:`yarn_inv_freq`);
* ``attention_factor``: cos and sin are multiplied by it, so the rotary part of every q.k product is scaled
  by its square (:class:`ScaledRotaryEmbedding`);
* the softmax scale of multi-head latent attention, multiplied by ``mscale(factor, mscale_all_dim) ** 2``
  (:func:`mla_softmax_scale`).

The formulas follow transformers' ``_compute_yarn_parameters`` and ``yarn_apply_mscale``. DeepSeek's own
modelling code agrees on the published configs (where ``mscale == mscale_all_dim``). It differs in one
corner: with ``mscale`` set but ``mscale_all_dim`` absent, its cos/sin factor is ``mscale(factor, mscale)``
while transformers (and moetrain) use ``mscale(factor, 1)``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from moetrain.config import ModelConfig
from moetrain.models.attention import RotaryEmbedding


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _factor(scaling: dict[str, Any], max_position_embeddings: int) -> float:
    factor = scaling.get("factor")
    if factor is None:  # transformers: the ratio of the trained and the original context
        return max_position_embeddings / scaling["original_max_position_embeddings"]
    return float(factor)


def yarn_attention_factor(scaling: dict[str, Any], max_position_embeddings: int) -> float:
    """The factor applied to cos and sin."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _factor(scaling, max_position_embeddings)
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def yarn_inv_freq(
    dim: int, theta: float, scaling: dict[str, Any], *, max_position_embeddings: int, device: torch.device
) -> torch.Tensor:
    """(dim/2,) fp32 inverse frequencies with YaRN's interpolation/extrapolation blend."""
    factor = _factor(scaling, max_position_embeddings)
    original = scaling["original_max_position_embeddings"]
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the dim index whose wavelength fits ``rotations`` full turns into the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    extrapolation = 1 - ramp  # 1: keep the frequency (high frequencies), 0: interpolate it
    return (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation


def mla_softmax_scale(qk_head_dim: int, scaling: Optional[dict[str, Any]], max_position_embeddings: int) -> float:
    """Softmax scale of multi-head latent attention: ``qk_head_dim ** -0.5``, times ``mscale(factor,
    mscale_all_dim) ** 2`` under YaRN when ``mscale_all_dim`` is set."""
    scale = qk_head_dim ** -0.5
    if scaling and scaling.get("mscale_all_dim"):
        factor = _factor(scaling, max_position_embeddings)
        scale *= yarn_mscale(factor, scaling["mscale_all_dim"]) ** 2
    return scale


class ScaledRotaryEmbedding(RotaryEmbedding):
    """YaRN rotary tables: scaled inverse frequencies, cos/sin multiplied by the attention factor."""

    def __init__(self, dim: int, theta: float, scaling: dict[str, Any], max_position_embeddings: int) -> None:
        self.scaling = dict(scaling)
        self.max_position_embeddings = max_position_embeddings
        self.attention_factor = yarn_attention_factor(self.scaling, max_position_embeddings)
        super().__init__(dim, theta)

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        return yarn_inv_freq(self.dim, self.theta, self.scaling, max_position_embeddings=self.max_position_embeddings,
                             device=device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: (B, L) -> cos, sin of shape (B, 1, L, dim), scaled in fp32 before the cast."""
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32 or inv_freq.device != position_ids.device:
            inv_freq = self._inv_freq(position_ids.device)
        freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, L, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def rotary_for(config: ModelConfig) -> RotaryEmbedding:
    """The rotary module of ``config``: plain, or YaRN-scaled when ``rope_scaling`` is set (MLA families)."""
    if config.rope_scaling:
        return ScaledRotaryEmbedding(config.rotary_dim, config.rope_theta, config.rope_scaling,
                                     config.max_position_embeddings)
    return RotaryEmbedding(config.rotary_dim, config.rope_theta)
