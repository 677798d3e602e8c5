"""Packed documents through variable-length flash attention instead of a dense (B, 1, L, L) mask.

A training row packs several documents, and attention stays inside each one. With a dense boolean mask, SDPA
runs a masked kernel over every (query, key) pair of the row: on the DeepSeek-MoE-16B recipe (4 x 2048 tokens)
cuDNN's masked kernels took 88 ms of two micro-batches' GPU time, several times plain causal attention, and the
masked pairs are most of the work. Flash attention's variable-length form takes the row's documents as separate
sequences (``cu_seqlens``: where each starts in the flattened batch) and runs causal attention inside each: the
same arithmetic the mask describes, on the pairs that count only.

:func:`document_spans` turns ``document_ids`` (B, L) into :class:`DocumentSpans` once a forward (one small host
read; a training batch brings them computed in host memory instead: :func:`with_spans`); the attention layers take
them where they took the mask, and fall back to the dense mask (:func:`moetrain.models.attention.dense_mask`, built
once a forward) where the variable-length kernel does not apply: fp32, a head size flash attention does not take,
MLA (its value width differs from its query's). Off CUDA the decoder builds the dense mask itself, as before.
Queries, keys and values go in tokens-major, (B * L, n, hd), the projections' own layout, with grouped queries'
key/value heads not repeated where torch's ``varlen_attn`` takes them so (``enable_gqa``, flash attention).
``MOETRAIN_VARLEN_ATTN=0`` turns it off (benchmarks and tests compare the two).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional

import torch

from moetrain.models.kernel_switch import switched_on

ENV = "MOETRAIN_VARLEN_ATTN"


@lru_cache(maxsize=1)
def _varlen_fn():
    """torch's ``varlen_attn`` (torch >= 2.10), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@lru_cache(maxsize=1)
def _causal() -> dict[str, Any]:
    """The keyword that makes ``varlen_attn`` causal in this torch: ``window_size`` (2.10 on) or ``is_causal``."""
    return {"window_size": (-1, 0)} if "window_size" in inspect.signature(_varlen_fn()).parameters \
        else {"is_causal": True}


@dataclass
class DocumentSpans:
    """The documents of a packed batch, as flash attention's variable-length form takes them.

    Attributes:
        document_ids: (B, L) the packed-document id of each position (attention stays inside a document).
        cu_seqlens: (N + 1,) int32 on the batch's device: where each of the N documents starts in the flattened
            (B * L) batch, then B * L. A document never crosses a row: a row's first position starts one.
        max_len: the longest document, in tokens.
    """

    document_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    dense: Optional[torch.Tensor] = field(default=None, repr=False)
    """The equivalent dense (B, 1, L, L) bool mask, once a layer that cannot take the spans built it
    (:func:`moetrain.models.attention.dense_mask`)."""


def cu_seqlens(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(``cu_seqlens`` (N + 1,) int32 in host memory, the longest document) of ``document_ids`` (B, L): a document
    starts at each row's first position and wherever the id changes along a row. From device ids this is one host
    read (the number of documents sets the output's shape); from host ids, none."""
    b, seq = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    at = torch.nonzero(starts.reshape(-1)).flatten().cpu()  # (N,) first flat position of each document
    cu = torch.cat([at, torch.tensor([b * seq])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def document_spans(document_ids: torch.Tensor) -> DocumentSpans:
    """:class:`DocumentSpans` of ``document_ids`` (B, L) (see :func:`cu_seqlens`)."""
    cu, max_len = cu_seqlens(document_ids)
    return DocumentSpans(document_ids, cu.to(document_ids.device, non_blocking=True), max_len)


SPAN_KEYS = ("cu_seqlens", "max_document_len")
"""The keys a collated batch carries its documents' spans under (:func:`with_spans`), computed in host memory so
that the forward reads nothing back from the device: that read waits for every kernel queued before it, the
previous micro-batch's backward included, and the GPU then idles while the host queues the next forward."""


def with_spans(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` (collated, in host memory) with its packed documents' spans added under :data:`SPAN_KEYS`; as it
    was if it has no ``document_ids``."""
    if batch.get("document_ids") is None:
        return batch
    return batch | dict(zip(SPAN_KEYS, cu_seqlens(batch["document_ids"]), strict=True))


def batch_spans(batch: dict[str, Any]) -> Optional[DocumentSpans]:
    """The :class:`DocumentSpans` a batch carries (:func:`with_spans`, then moved to its device), or None."""
    if batch.get("document_ids") is None or any(k not in batch for k in SPAN_KEYS):
        return None
    cu, max_len = (batch[k] for k in SPAN_KEYS)
    return DocumentSpans(batch["document_ids"], cu, int(max_len))


def spans_wanted(device: torch.device) -> bool:
    """Whether a forward on ``device`` should pass its packed documents as :class:`DocumentSpans` (CUDA, torch has
    ``varlen_attn``, the environment allows it); elsewhere the dense mask is built as before."""
    return device.type == "cuda" and switched_on(ENV) and _varlen_fn() is not None


def varlen_applies(q: torch.Tensor, head_dim: int) -> bool:
    """Whether :func:`varlen_causal_attention` runs for queries ``q``: CUDA, bf16 or fp16, a head size flash
    attention takes (a multiple of 8, at most 256), torch has ``varlen_attn`` and the environment allows it."""
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and head_dim % 8 == 0 and head_dim <= 256
            and spans_wanted(q.device))


@lru_cache(maxsize=8)
def _kv_heads_unrepeated(device_index: int) -> bool:
    """Whether ``varlen_attn`` takes fewer key/value heads than query heads on CUDA device ``device_index``: it has
    ``enable_gqa`` (torch 2.13 does), and its backend there is flash attention, which reads each key/value head for
    its group of query heads. torch 2.13's cuDNN backend raises on ``enable_gqa``; torch chooses it by
    ``torch.nn.attention.varlen._should_use_cudnn`` (False for every device in 2.13). Where that could say True, or
    where torch no longer has it to ask, the key/value heads are repeated as before, so cuDNN never sees GQA."""
    fn = _varlen_fn()
    if fn is None or "enable_gqa" not in inspect.signature(fn).parameters:
        return False
    should_use_cudnn = getattr(sys.modules.get(fn.__module__), "_should_use_cudnn", None)
    try:
        return should_use_cudnn is not None and not should_use_cudnn(device_index)
    except Exception:  # a private helper of torch's: a new signature means its choice is unknown, so repeat
        return False


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, spans: DocumentSpans) -> torch.Tensor:
    """Causal attention inside each document of ``spans``, as SDPA with the dense mask of the spans computes it.

    q (B * L, nh, hd), k and v (B * L, nkv, hd), tokens-major (the (B, L, n, hd) projections reshaped, no copy) with
    ``nh`` a multiple of ``nkv`` -> (B * L, nh, hd). Grouped queries' key/value heads go to flash attention as they
    are (query head ``j`` reads key/value head ``j // (nh / nkv)``, as ``repeat_interleave`` along the heads lays
    them out): no repeated copies forward (flash attention's backward still sums each group's key/value gradients,
    as ``repeat_interleave``'s backward did). Where this torch cannot take them so (:func:`_kv_heads_unrepeated`),
    they are repeated here.
    """
    extra: dict[str, Any] = {}
    rep = q.shape[1] // k.shape[1]
    if rep > 1 and _kv_heads_unrepeated(q.device.index):
        extra["enable_gqa"] = True
    elif rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return _varlen_fn()(q, k, v, spans.cu_seqlens, spans.cu_seqlens, spans.max_len, spans.max_len, **_causal(),
                        **extra)
