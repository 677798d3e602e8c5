"""Multi-head latent attention (MLA), the attention of DeepSeek-V2 and DeepSeek-V3.

Keys and values are produced from one small latent per token instead of per-head projections::

    x (H) --kv_a_proj_with_mqa--> [latent (r) | k_rot (dr)]
    latent --kv_a_layernorm--> --kv_b_proj--> per head [k_nope (dn) | v (dv)]
    x --q_proj (or q_a_proj -> q_a_layernorm -> q_b_proj)--> per head [q_nope (dn) | q_rot (dr)]

Only the ``dr`` rotary dims carry positions, and the rotary key ``k_rot`` is shared by all heads (it comes
from the latent projection, like multi-query attention). A head's query/key is ``[nope | rot]`` of width
``dn + dr`` and its value has width ``dv``.

Rotary layout: DeepSeek's checkpoints store the rotary dims as interleaved pairs (x0, x1), (x2, x3), ...
(``rope_interleave``). transformers' DeepSeek-V2 rotates them as complex numbers (interleaved output),
its DeepSeek-V3 de-interleaves to [evens | odds] and rotates by halves. Both apply the same permutation to
q and k, so q.k, and the model, are the same; moetrain de-interleaves as transformers' V3 does.

Inference engines cache only the latent and ``k_rot`` (that is MLA's point); for training the expanded
keys and values are what the attention kernel needs, so :class:`~moetrain.models.attention.KVCache` holds
those.

Shapes: ``B`` batch, ``L`` query length, ``S`` key length, ``nh`` heads, ``r`` kv_lora_rank, ``dn``
qk_nope_head_dim, ``dr`` qk_rope_head_dim, ``dv`` v_head_dim.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moetrain.config import ModelConfig
from moetrain.models.attention import KVCache, RMSNorm, apply_rotary, dense_mask
from moetrain.models.rope import mla_softmax_scale
from moetrain.models.varlen import DocumentSpans

LATENT_NORM_EPS = 1e-6
"""DeepSeek's and transformers' latent norms use RMSNorm's default eps, not config.rms_norm_eps."""


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(..., dr) interleaved pairs (x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...), the rotate-half layout."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA with Hugging Face parameter names (q_proj or q_a_proj/q_a_layernorm/q_b_proj,
    kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.interleaved = config.rope_interleave
        h, nh = config.hidden_size, self.num_heads
        self.q_lora_rank = config.q_lora_rank
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(h, nh * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, nh * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, nh * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(nh * self.v_dim, h, bias=False)
        self.scaling = mla_softmax_scale(self.qk_dim, config.rope_scaling, config.max_position_embeddings)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            x = deinterleave(x)
        return apply_rotary(x, cos, sin)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Optional[torch.Tensor | DocumentSpans],
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """x: (B, L, H); cos, sin: (B, 1, L, dr); mask: (B, 1, L, S) bool or None (causal). Returns (B, L, H)."""
        if isinstance(mask, DocumentSpans):  # packed documents: the dense mask (the flash path here is left to come)
            mask = dense_mask(mask)
        b, seq, _ = x.shape
        nh = self.num_heads
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, seq, nh, self.qk_dim).transpose(1, 2)  # (B, nh, L, dn + dr)
        q_nope, q_rot = q.split([self.nope_dim, self.rope_dim], dim=-1)
        # (B, L, r), (B, L, dr)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent))  # (B, L, nh * (dn + dv))
        kv = kv.view(b, seq, nh, self.nope_dim + self.v_dim).transpose(1, 2)  # (B, nh, L, dn + dv)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q_rot = self._rotate(q_rot, cos, sin)
        k_rot = self._rotate(k_rot[:, None], cos, sin)  # (B, 1, L, dr): one rotary key for all heads
        q = torch.cat((q_nope, q_rot), dim=-1)  # (B, nh, L, dn + dr)
        k = torch.cat((k_nope, k_rot.expand(-1, nh, -1, -1)), dim=-1)  # (B, nh, L, dn + dr)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, S, .)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=self.scaling)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        out = out.transpose(1, 2).reshape(b, seq, nh * self.v_dim)  # (B, L, nh * dv)
        return self.o_proj(out)
