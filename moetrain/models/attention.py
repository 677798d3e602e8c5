"""Causal self-attention with rotary embeddings, grouped-query heads, optional q/k RMSNorm
(per head for qwen3_moe, over the full projection for olmoe), qkv bias (qwen2_moe), a sliding
window (mixtral), padding and packed-document masks, and an optional KV cache for generation.

On CUDA in bf16 the rotary is one fused pass each way over the projections' own (B, L, n, hd) layout
(:mod:`moetrain.models.rope_kernel`), and packed documents reach variable-length flash attention in that layout,
key/value heads unrepeated (:mod:`moetrain.models.varlen`); every other path computes as it always has.

Shapes: ``B`` batch, ``L`` query length, ``S`` key length, ``nh`` query heads, ``nkv`` kv heads,
``hd`` head dim.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moetrain.config import ModelConfig
from moetrain.models.rmsnorm_kernel import rms_norm
from moetrain.models.rope_kernel import apply_rotary, rotary_eager  # apply_rotary: multi-head latent attention's too
from moetrain.models.rope_kernel import kernel_applies as rotary_kernel_applies
from moetrain.models.varlen import DocumentSpans, varlen_applies, varlen_causal_attention


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as the Hugging Face families do."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32, cast back, times the weight (cast to x's dtype under autocast: a bf16
        # residual stream keeps bf16 outputs, MoEForCausalLM.set_residual_dtype). On CUDA in bf16 one Triton kernel
        # each way (moetrain.models.rmsnorm_kernel); elsewhere F.rms_norm on an fp32 copy, the same arithmetic as the
        # Hugging Face families' written-out norm (bit for bit on the CPU)
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; ``inv_freq`` is recomputed, never loaded from checkpoints."""

    def __init__(self, dim: int, theta: float) -> None:
        super().__init__()
        self.dim, self.theta = dim, theta
        self.register_buffer("inv_freq", self._inv_freq(torch.device("cpu")), persistent=False)

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: (B, L) -> cos, sin of shape (B, 1, L, hd)."""
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32 or inv_freq.device != position_ids.device:
            # ``module.to(bfloat16)`` casts buffers too; the frequencies must stay fp32.
            inv_freq = self._inv_freq(position_ids.device)
        freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, L, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def build_attention_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    *, device: torch.device,
    key_valid: Optional[torch.Tensor] = None,
    document_ids: Optional[torch.Tensor] = None,
    sliding_window: Optional[int] = None,
) -> Optional[torch.Tensor]:
    """A (B, 1, L, S) bool mask (True = attend), or None when plain causal attention suffices.

    Queries are the last ``q_len`` of ``kv_len`` positions. ``key_valid`` (B, S) marks real tokens;
    ``document_ids`` (B, S) keeps attention inside each packed document. A query row with nothing
    to attend to (a padding position) attends to itself so that no NaN appears.
    """
    if key_valid is None and document_ids is None and sliding_window is None and q_len == kv_len:
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)  # (L,)
    k_pos = torch.arange(kv_len, device=device)  # (S,)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, L, S)
    if sliding_window is not None:
        mask = mask & (k_pos[None, :] > q_pos[:, None] - sliding_window)[None, None]
    mask = mask.expand(batch, 1, q_len, kv_len)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :].bool()
    if document_ids is not None:
        q_doc = document_ids[:, kv_len - q_len:]
        mask = mask & (q_doc[:, None, :, None] == document_ids[:, None, None, :])
    diag = (k_pos[None, :] == q_pos[:, None])[None, None]
    return mask | (diag & ~mask.any(-1, keepdim=True))


def dense_mask(spans: DocumentSpans) -> torch.Tensor:
    """The (B, 1, L, L) bool mask equivalent to packed documents' ``spans``, built by the first layer that needs it
    (one that cannot run the variable-length kernel) and kept on the spans for the forward's other layers."""
    if spans.dense is None:
        b, seq = spans.document_ids.shape
        spans.dense = build_attention_mask(b, seq, seq, device=spans.document_ids.device,
                                           document_ids=spans.document_ids)
    return spans.dense


class KVCache:
    """Per-layer key/value tensors of shape (B, nkv, S, hd), grown by concatenation."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers

    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    """Multi-head causal self-attention with HF parameter names (q_proj, k_proj, v_proj, o_proj)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.kv_heads
        self.head_dim = config.attn_head_dim
        self.qk_norm = config.qk_norm
        h, hd = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=False)
        if config.qk_norm == "head":
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        elif config.qk_norm == "full":
            self.q_norm = RMSNorm(self.num_heads * hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.num_kv_heads * hd, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Optional[torch.Tensor | DocumentSpans],
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """x: (B, L, H) -> (B, L, H); cos, sin: (B, 1, L, hd); ``mask``: (B, 1, L, S) bool, None (causal) or packed
        documents' spans."""
        b, seq, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(b, seq, nh, hd), k.view(b, seq, nkv, hd), v.view(b, seq, nkv, hd)  # (B, L, n, hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        # packed documents go to variable-length flash attention where it runs (the rotated q's dtype is the one
        # q and cos have in common: the same dtype keeps varlen_applies' answer for it)
        varlen = (isinstance(mask, DocumentSpans) and cache is None and cos.dtype == q.dtype
                  and varlen_applies(q, hd))
        cos_t, sin_t = cos.transpose(1, 2), sin.transpose(1, 2)  # (B, L, 1, hd) views
        if varlen or rotary_kernel_applies(q, cos_t, sin_t):
            # the rotary in the projections' own layout, (B, L, n, hd) contiguous: the fused kernel takes it
            # (moetrain.models.rope_kernel), and the variable-length attention takes it as it is, no transpose
            q, k = apply_rotary(q, cos_t, sin_t), apply_rotary(k, cos_t, sin_t)
            if varlen:  # tokens-major (B * L, n, hd) views, key/value heads not repeated (varlen_causal_attention)
                out = varlen_causal_attention(q.reshape(b * seq, nh, hd), k.reshape(b * seq, nkv, hd),
                                              v.reshape(b * seq, nkv, hd), spans=mask)  # (B * L, nh, hd)
                return self.o_proj(out.reshape(b, seq, nh * hd))
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n, L, hd)
        else:
            # the eager formula after the transpose, as before: the same values in either layout, and the gradients
            # reaching q_norm and k_norm keep their layout, so those weights' gradient sums keep their order (the
            # CPU's numbers are bit for bit those of before)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n, L, hd)
            q, k = rotary_eager(q, cos, sin), rotary_eager(k, cos, sin)
        if isinstance(mask, DocumentSpans):
            mask = dense_mask(mask)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd)
        if nkv != nh:
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, seq, nh * hd)  # (B, L, nh*hd)
        return self.o_proj(out)
