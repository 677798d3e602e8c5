"""Packed documents' spans (``moetrain.models.varlen``): the spans say what the dense mask says; off CUDA every
layer takes the dense mask, bit for bit the same as before. The flash path itself is checked against the dense
mask on the GPU (``tests/gpu/test_varlen_cuda.py``)."""

from __future__ import annotations

import torch

from moetrain.config import ModelConfig
from moetrain.models.attention import Attention, build_attention_mask, dense_mask
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.varlen import document_spans, spans_wanted

DOCS = torch.tensor([[0, 0, 0, 1, 1, 2, 2], [5, 5, 5, 5, 5, 5, 5]])  # row 0: three documents; row 1: one


def test_spans_start_each_row_and_each_document():
    spans = document_spans(DOCS)
    assert spans.cu_seqlens.dtype == torch.int32
    assert spans.cu_seqlens.tolist() == [0, 3, 5, 7, 14]  # row 1 starts a document even with row 0's last id
    assert spans.max_len == 7
    assert torch.equal(dense_mask(spans), build_attention_mask(2, 7, 7, device=DOCS.device, document_ids=DOCS))


def test_ids_that_repeat_in_a_row_are_separate_documents():
    """Packing numbers documents per row; an id that comes back after another is a new document, as in the mask
    (which compares ids only: the spans are never wider than what the mask allows)."""
    docs = torch.tensor([[0, 0, 1, 1, 0, 0]])
    assert document_spans(docs).cu_seqlens.tolist() == [0, 2, 4, 6]


def test_off_cuda_the_layers_take_the_dense_mask():
    assert not spans_wanted(torch.device("cpu"))
    torch.manual_seed(0)
    cfg = ModelConfig(family="deepseek_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    attn = Attention(cfg, 0)
    x = torch.randn(2, 7, 32)
    pos = torch.arange(7)[None].expand(2, -1)
    model = MoEForCausalLM(cfg)
    cos, sin = model.model.rotary(pos, x.dtype)
    spans = document_spans(DOCS)
    assert torch.equal(attn(x, cos, sin, spans), attn(x, cos, sin, dense_mask(spans)))


def test_a_collated_batch_carries_the_spans_of_its_documents():
    """The data loaders' collation computes the spans in host memory (no device read in the forward); they are the
    spans the forward would compute, and a batch without documents is left as it was."""
    from moetrain.models.varlen import batch_spans, with_spans
    from moetrain.training.data import collate_rows

    rows = [{"input_ids": torch.arange(7), "document_ids": row} for row in DOCS]
    batch = collate_rows(rows)
    assert batch["input_ids"].shape == (2, 7) and batch["max_document_len"] == 7
    spans = batch_spans(batch)
    assert spans.document_ids is batch["document_ids"] and spans.max_len == document_spans(DOCS).max_len
    assert torch.equal(spans.cu_seqlens, document_spans(DOCS).cu_seqlens)
    plain = {"input_ids": torch.zeros(2, 7, dtype=torch.long)}
    assert with_spans(plain) is plain and batch_spans(plain) is None
