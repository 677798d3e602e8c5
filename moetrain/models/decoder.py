"""The decoder-only MoE language model shared by every family.

Parameter names equal Hugging Face's for the common layout (``model.layers.{i}.self_attn.q_proj``,
``model.layers.{i}.mlp.gate``, ``model.layers.{i}.mlp.experts.{e}.gate_proj``, ...); per-family
differences (Mixtral's ``block_sparse_moe.experts.{e}.w1``, Qwen2's ``shared_expert``) are handled
by the key maps in :mod:`moetrain.models.hf`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from moetrain.config import ModelConfig
from moetrain.models.attention import Attention, KVCache, RMSNorm, build_attention_mask
from moetrain.models.experts import SwiGLU
from moetrain.models.mla import MultiHeadLatentAttention
from moetrain.models.moe import MoEBlock
from moetrain.models.rope import rotary_for
from moetrain.models.router import Routing, TopKRouter
from moetrain.models.seam import ExpertWeights, RoutingSink
from moetrain.models.varlen import DocumentSpans, document_spans, spans_wanted

IGNORE_INDEX = -100
INIT_STD = 0.02
"""Standard deviation of every normal initialisation (the Hugging Face families' ``initializer_range``)."""


@dataclass
class MoEOutput:
    """What the model returns.

    Attributes:
        logits: (B, L, V), fp32; None when the forward was asked for the loss only.
        aux_loss: scalar, the sum of every MoE layer's (already weighted) auxiliary loss.
        loss: scalar cross-entropy over shifted labels plus ``aux_loss`` when labels were given.
        ce_loss: the cross-entropy part alone.
        layer_aux_losses: one scalar per MoE layer, in layer order.
        routings: {layer index: Routing} of this forward pass.
    """

    logits: Optional[torch.Tensor]
    aux_loss: torch.Tensor
    loss: Optional[torch.Tensor] = None
    ce_loss: Optional[torch.Tensor] = None
    layer_aux_losses: list[torch.Tensor] = field(default_factory=list)
    routings: dict[int, Routing] = field(default_factory=dict)


def _chunk_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()  # (n, V)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    *, chunk_tokens: int = 4096) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` without materialising all logits.

    Each chunk of ``chunk_tokens`` rows computes its (n, V) logits, sums its token losses and drops
    them; backward recomputes one chunk at a time (activation checkpointing), so peak memory holds one
    chunk's logits instead of (N, V) in fp32 several times over. Equal to ``F.cross_entropy(..., mean)``
    up to the order of the fp32 sum.

    Args:
        hidden: (N, H) final hidden states (after the last norm).
        weight: (V, H) output embedding.
        labels: (N,) targets, ``-100`` ignored.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + torch.utils.checkpoint.checkpoint(
            _chunk_ce_sum, hidden[part], weight, labels[part], use_reentrant=False)
    count = (labels != IGNORE_INDEX).sum().clamp_min(1)
    return total / count


class _CheckpointedLayer:
    """A decoder layer as activation checkpointing calls it: its first call is the forward, every later call the
    recomputation in backward, told to the layer as ``recomputing=True`` (its routing was already reported, and
    paged weights must not prefetch the layer after it). One per layer and forward pass: no shared state."""

    def __init__(self, layer: DecoderLayer) -> None:
        self.layer = layer
        self.ran = False

    def __call__(self, *args) -> tuple[torch.Tensor, Optional[Routing]]:
        recomputing, self.ran = self.ran, True
        return self.layer(*args, recomputing=recomputing)


class DecoderLayer(nn.Module):
    """Pre-norm attention (multi-head latent attention for deepseek_v2/v3) then an MoE block (or a dense SwiGLU
    MLP on non-MoE layers)."""

    def __init__(self, config: ModelConfig, layer_idx: int, aux_scale: float) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn: nn.Module = (
            MultiHeadLatentAttention(config, layer_idx) if config.is_mla else Attention(config, layer_idx)
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp: nn.Module = (
            MoEBlock(config, layer_idx, aux_scale) if self.is_moe
            else SwiGLU(config.hidden_size, config.intermediate_size)
        )

    def forward(self, x, cos, sin, mask, valid, cache=None, *,
                recomputing: bool = False) -> tuple[torch.Tensor, Optional[Routing]]:
        """x: (B, L, H) -> ((B, L, H), the MoE layer's routing or None); ``recomputing``: activation
        checkpointing's re-run of this layer in backward."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, routing = self.mlp(h, valid, recomputing=recomputing)
            return x + out, routing
        return x + self.mlp(h), None


class Backbone(nn.Module):
    """Embeddings, decoder layers and the final norm (Hugging Face's ``model.``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        moe_layers = config.moe_layers
        # switch-style losses are averaged over MoE layers (the coefficient keeps its HF scale);
        # DeepSeek adds each layer's loss with the full alpha, as its own code does.
        aux_scale = 1.0 / max(len(moe_layers), 1) if config.aux_loss == "switch" else 1.0
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, aux_scale) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = rotary_for(config)


RESIDUAL_DTYPES = ("fp32", "bf16")
"""The residual stream's dtypes :meth:`MoEForCausalLM.set_residual_dtype` takes."""


class MoEForCausalLM(nn.Module):
    """Decoder-only MoE language model. ``forward(input_ids)`` returns :class:`MoEOutput`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.activation_checkpointing = False
        self.residual_dtype = "fp32"
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_kinds(self) -> dict[str, str]:
        """How every state-dict tensor starts: ``normal`` (N(0, :data:`INIT_STD`)), ``ones`` or ``zeros``.

        Linear and embedding weights and the routers are normal, biases (and DeepSeek-V3's routing bias) zero,
        norm weights one: the initialisation of the Hugging Face families. The one rule that
        :meth:`reset_parameters` and the seeded per-tensor initialisation (:mod:`moetrain.models.random_init`)
        both follow. Ordered as the state dict is; a tied ``lm_head.weight`` is listed too.

        Raises:
            TypeError: a parameter or persistent buffer of a module kind the rule does not know (a new module
                must say how it starts, rather than keep whatever its constructor left).
        """
        kinds: dict[str, str] = {}
        for prefix, module in self.named_modules(remove_duplicate=False):
            at = f"{prefix}." if prefix else ""
            if isinstance(module, (nn.Linear, nn.Embedding, TopKRouter)):
                kinds[f"{at}weight"] = "normal"
            elif isinstance(module, RMSNorm):
                kinds[f"{at}weight"] = "ones"
            if getattr(module, "bias", None) is not None:
                kinds[f"{at}bias"] = "zeros"
            if getattr(module, "e_score_correction_bias", None) is not None:
                kinds[f"{at}e_score_correction_bias"] = "zeros"
        names = list(self.state_dict(keep_vars=True))
        unknown = [n for n in names if n not in kinds]
        if unknown:
            raise TypeError(f"no initialisation rule for {unknown[:4]}; add the module kind to init_kinds")
        return {n: kinds[n] for n in names}

    @torch.no_grad()
    def reset_parameters(self, std: float = INIT_STD) -> None:
        """Draw every tensor from torch's global generator as :meth:`init_kinds` says, one after another.

        The routers are drawn last: the order, and so the weights, that every seeded run has had. On the meta
        device nothing is drawn (meta tensors hold no values, and torch's reference ``normal_`` costs about
        2 ms a tensor: seconds for a 16 B model).
        """
        tensors = self.state_dict(keep_vars=True)
        if any(t.is_meta for t in tensors.values()):
            return
        routers = {f"{name}.weight" for name, m in self.named_modules() if isinstance(m, TopKRouter)}
        kinds = self.init_kinds()
        for name in sorted(kinds, key=lambda n: n in routers):  # stable: state-dict order, routers at the end
            if kinds[name] == "normal":
                tensors[name].normal_(0.0, std)
            else:
                tensors[name].fill_(1.0 if kinds[name] == "ones" else 0.0)

    # ------------------------------------------------------------------ structure
    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def attach_offload(self, *, weights: Optional[ExpertWeights] = None, routing: Optional[RoutingSink] = None) -> None:
        """The seam to an offload engine (:mod:`moetrain.models.seam`), attached once per part.

        Args:
            weights: where the routed experts' compute weights live when their parameters are placeholders
                (``resident_weights: no``); every MoE layer's experts run through it from now on.
            routing: told every MoE layer's routing before its experts run (the engine, or the multi-rank
                wrapper standing in front of it); replaces the sink attached before.
        """
        for block in self.moe_blocks():
            if weights is not None:
                block.experts.pager = weights
            if routing is not None:
                block.sink = routing

    def detach_routing(self) -> None:
        """No sink is told the routing any more (the engine closed). Paged weights stay: they hold the values."""
        for block in self.moe_blocks():
            block.sink = None

    def set_expert_impl(self, impl: str) -> None:
        """Choose the expert compute path: ``auto``, ``grouped`` or ``loop``."""
        for block in self.moe_blocks():
            block.experts.impl = impl

    def set_activation_checkpointing(self, on: bool) -> None:
        """Keep only each decoder layer's input in training forwards and recompute the layer in backward:
        activation memory of one layer instead of all, for about a third more compute."""
        self.activation_checkpointing = on

    def set_residual_dtype(self, name: str) -> None:
        """``fp32``: under bf16 autocast over fp32 weights the residual stream is fp32 from the embedding on (as in
        a Hugging Face model trained with autocast); every norm, rotary, residual add and expert dispatch then casts
        it each way every micro-batch. ``bf16``: the embedding's output is cast to bf16 under bf16 autocast, so the
        stream is bf16 as in a bf16 model (Megatron-LM's default); norms still compute in fp32, and weights,
        gradients and the optimizer stay fp32. Without bf16 autocast (the CPU's ``32-true``) nothing changes."""
        if name not in RESIDUAL_DTYPES:
            raise ValueError(f"residual dtype {name!r}: choose fp32 or bf16")
        self.residual_dtype = name

    def expert_parameter_names(self) -> set[str]:
        """Names of the routed experts' parameters (the part the offload engine owns)."""
        return {n for n, _ in self.named_parameters() if ".mlp.experts." in n}

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        return_logits: bool = True,
        spans: Optional[DocumentSpans] = None,
    ) -> MoEOutput:
        """Run the model.

        Args:
            input_ids: (B, L) token ids.
            attention_mask: (B, S) 1 for real tokens, 0 for padding (S = cached + L).
            labels: (B, L) targets aligned with ``input_ids`` (shifted inside), -100 to ignore.
            position_ids: (B, L); defaults to positions after the cache (packing passes its own).
            document_ids: (B, L) packed-document ids; attention stays inside each document.
            cache: a :class:`KVCache` for incremental decoding.
            return_logits: with ``False`` (and labels) the loss is computed in chunks of tokens, each chunk's
                logits recomputed in backward, and ``logits`` is None: the training path.
            spans: ``document_ids``' spans computed in host memory (:func:`moetrain.models.varlen.batch_spans`), so
                the forward reads nothing back from the device; None: computed here (one device read).
        """
        b, seq = input_ids.shape
        past = cache.length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=input_ids.device)[None].expand(b, -1)
        x = self.model.embed_tokens(input_ids)  # (B, L, H)
        if (self.residual_dtype == "bf16" and torch.is_autocast_enabled(x.device.type)
                and torch.get_autocast_dtype(x.device.type) == torch.bfloat16):
            x = x.to(torch.bfloat16)  # the residual stream in bf16 (set_residual_dtype)
        cos, sin = self.model.rotary(position_ids, x.dtype)
        key_valid = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_valid = attention_mask.bool()
        if (document_ids is not None and key_valid is None and cache is None
                and self.config.sliding_window is None and spans_wanted(input_ids.device)):
            # packed documents: variable-length flash attention (varlen.py)
            mask = spans if spans is not None else document_spans(document_ids)
        else:
            mask = build_attention_mask(b, seq, past + seq, device=input_ids.device, key_valid=key_valid,
                                        document_ids=document_ids, sliding_window=self.config.sliding_window)
        valid = None if key_valid is None else key_valid[:, past:]  # (B, L) real query tokens
        layer_aux: list[torch.Tensor] = []
        routings: dict[int, Routing] = {}
        checkpoint = self.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for layer in self.model.layers:
            if checkpoint:
                x, routing = torch.utils.checkpoint.checkpoint(_CheckpointedLayer(layer), x, cos, sin, mask, valid,
                                                               use_reentrant=False)
            else:
                x, routing = layer(x, cos, sin, mask, valid, cache)
            if routing is not None:
                layer_aux.append(routing.aux_loss)
                routings[layer.layer_idx] = routing
        x = self.model.norm(x)
        aux = torch.stack(layer_aux).sum() if layer_aux else x.new_zeros((), dtype=torch.float32)
        if not return_logits and labels is not None:
            # training: the loss without the (B, L, V) fp32 logits, which dominate activation memory
            ce = chunked_lm_loss(x[:, :-1].reshape(-1, x.shape[-1]), self.lm_head.weight, labels[:, 1:].reshape(-1))
            return MoEOutput(logits=None, aux_loss=aux, loss=ce + aux, ce_loss=ce, layer_aux_losses=layer_aux,
                             routings=routings)
        logits = self.lm_head(x).float()  # (B, L, V)
        out = MoEOutput(logits=logits, aux_loss=aux, layer_aux_losses=layer_aux, routings=routings)
        if labels is not None:
            ce = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
            )
            out.ce_loss = ce
            out.loss = ce + aux
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
