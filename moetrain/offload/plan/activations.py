"""What autograd keeps for backward: the planner's estimate of one micro-batch's activations on the GPU."""

from __future__ import annotations

from moetrain.config import ModelConfig

LOSS_CHUNK_TOKENS = 4096
"""Tokens per chunk of the training loss (``models.decoder.chunked_lm_loss``): one chunk's logits at a time."""


def activation_bytes(config: ModelConfig, tokens: int, checkpointed: bool = False, *, residual_bytes: int = 4) -> int:
    """An estimate of what autograd keeps for backward from one micro-batch of ``tokens`` tokens.

    A tally of the tensors each layer saves under bf16 autocast, attention through SDPA (no (L, L) score
    matrix: a per-head fp32 logsumexp), and the loss's logits one :data:`LOSS_CHUNK_TOKENS` chunk at a time.
    Per token and layer: each of the two norms saves its fp32 input and hands on a bf16 output; attention
    saves q, k, v and its output (MLA also its latents); a routed expert saves, for each of the k copies of
    a token, its gathered input, gate, up and activated product and its output; the router its fp32 logits
    and probabilities; a shared expert or dense MLP its gate, up and product. Temporaries and fragmentation
    are in :data:`.GPU_RESERVE`. The test checks it against the bytes autograd saves in a real forward
    (tests/offload/test_plan.py).

    ``checkpointed`` (``model.activation_checkpointing``): every layer keeps only its fp32 input, and one
    layer's full set (the largest, :func:`layer_activation_bytes`) exists while backward recomputes it.
    ``residual_bytes`` (``model.residual_dtype``): 4 for an fp32 residual stream, 2 for bf16 (each norm then saves
    the fp32 copy it computes in and a bf16 normalised output: 8 h a token instead of 14 h).
    """
    layers, largest, outside = _activation_parts(config, residual_bytes)
    loss_chunk = 2 * 4 * min(tokens, LOSS_CHUNK_TOKENS) * config.vocab_size  # fp32 logits and their gradient
    if checkpointed:
        inputs = config.num_hidden_layers * residual_bytes * config.hidden_size
        return tokens * (inputs + largest + outside) + loss_chunk
    return tokens * (layers + outside) + loss_chunk


def layer_activation_bytes(config: ModelConfig, tokens: int, *, residual_bytes: int = 4) -> int:
    """What the largest decoder layer saves for ``tokens`` tokens: with activation checkpointing, the part of
    :func:`activation_bytes` that exists only while backward recomputes that layer."""
    return tokens * _activation_parts(config, residual_bytes)[1]


def _activation_parts(config: ModelConfig, residual_bytes: int = 4) -> tuple[int, int, int]:
    """Bytes per token saved by (all decoder layers, the largest one, the final norm and what follows)."""
    h, nh = config.hidden_size, config.num_attention_heads
    if config.is_mla:
        qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        q, kv, out = nh * qk, nh * (qk + config.v_head_dim), nh * config.v_head_dim
        latent = config.kv_lora_rank + config.qk_rope_head_dim + (config.q_lora_rank or 0)
    else:
        q = out = nh * config.attn_head_dim
        kv, latent = 2 * config.kv_heads * config.attn_head_dim, 0
    # per norm, an fp32 stream: its fp32 input, fp32 normalised, fp32 residual sum and bf16 output (14 h); a bf16
    # stream (model.residual_dtype: bf16): the fp32 copy it computes in, bf16 normalised and bf16 output (8 h)
    norm = (3 * 4 * h if residual_bytes == 4 else 4 * h + 2 * h) + 2 * h
    attention = 2 * (q + kv + out + latent) + 4 * nh
    if config.qk_norm != "none":
        attention += 2 * 4 * (q + kv // 2)  # fp32 input and normalised output of the query and key norms
    k, inter = config.num_experts_per_tok, config.moe_intermediate_size
    moe = 2 * k * (h + 3 * inter + h) + 2 * 4 * config.num_experts + 2 * 3 * config.shared_width
    dense_mlp = 2 * 3 * config.intermediate_size
    n_moe = len(config.moe_layers)
    n_dense = config.num_hidden_layers - n_moe
    base = 2 * norm + attention
    layers = config.num_hidden_layers * base + n_moe * moe + n_dense * dense_mlp
    largest = base + max(moe if n_moe else 0, dense_mlp if n_dense else 0)
    return layers, largest, residual_bytes * h

