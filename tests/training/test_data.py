"""Packing, document ids, the shipped data and tokenizer, and data errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from moetrain.config import ModelConfig
from moetrain.models.decoder import IGNORE_INDEX, MoEForCausalLM
from moetrain.training.data import DataError, EpochShuffleSampler, TextDataModule, encode_records, pack_documents
from moetrain.training.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "data" / "tiny"


def naive_pack(docs: list[list[int]], seq_len: int, eos: int) -> list[dict[str, list[int]]]:
    """Reference packer: walk the token stream one token at a time."""
    stream = [(tok, d) for d, doc in enumerate(docs) for tok in doc + [eos]]
    rows = []
    for start in range(0, len(stream) - seq_len + 1, seq_len):
        chunk = stream[start:start + seq_len]
        row = {"input_ids": [], "labels": [], "document_ids": [], "position_ids": []}
        doc_index, pos = -1, 0
        for t, (tok, d) in enumerate(chunk):
            new_doc = t == 0 or d != chunk[t - 1][1]
            doc_index, pos = (doc_index + 1, 0) if new_doc else (doc_index, pos + 1)
            row["input_ids"].append(tok)
            row["labels"].append(IGNORE_INDEX if new_doc and t > 0 else tok)
            row["document_ids"].append(doc_index)
            row["position_ids"].append(pos)
        rows.append(row)
    return rows


@pytest.mark.parametrize("seq_len", [5, 8, 13])
def test_pack_matches_naive_packer(seq_len):
    gen = torch.Generator().manual_seed(seq_len)
    docs = [torch.randint(1, 50, (int(n),), generator=gen).tolist() for n in torch.randint(1, 12, (9,), generator=gen)]
    packed = pack_documents([(d, [True] * len(d)) for d in docs], seq_len, eos_id=0)
    expected = naive_pack(docs, seq_len, eos=0)
    assert len(packed) == len(expected) > 0
    for i, row in enumerate(expected):
        for key, values in row.items():
            assert getattr(packed, key)[i].tolist() == values, (key, i)


def test_loss_mask_ignores_untrained_tokens():
    docs = [([5, 6, 7], [False, True, True]), ([8, 9], [True, True])]
    packed = pack_documents(docs, seq_len=7, eos_id=0)
    # row: 5 6 7 EOS 8 9 EOS; 5 is masked by its loss mask, 8 because it starts a document
    assert packed.labels[0].tolist() == [IGNORE_INDEX, 6, 7, 0, IGNORE_INDEX, 9, 0]


def test_packed_row_equals_documents_alone():
    """document_ids and position_ids make a packed row compute exactly what each document computes alone."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, aux_loss="none")
    model = MoEForCausalLM(cfg).eval()
    docs = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15, 16, 17]]  # 6 + 4 + 8 = 18 tokens with EOS
    packed = pack_documents([(d, [True] * len(d)) for d in docs], seq_len=18, eos_id=1)
    with torch.no_grad():
        logits = model(packed.input_ids, position_ids=packed.position_ids, document_ids=packed.document_ids).logits
        start = 0
        for doc in docs:
            alone = model(torch.tensor([doc + [1]])).logits
            torch.testing.assert_close(logits[0, start:start + len(doc) + 1], alone[0], rtol=1e-5, atol=1e-5)
            start += len(doc) + 1


def test_too_little_data_is_an_error():
    with pytest.raises(DataError, match="seq_len=64"):
        pack_documents([([1, 2, 3], [True] * 3)], seq_len=64, eos_id=0)


def test_sampler_is_a_seeded_permutation_per_epoch():
    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    first = list(a)
    assert sorted(first) == list(range(50)) and first == list(b) and first != list(range(50))
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))
    assert list(EpochShuffleSampler(50, seed=4)) != first
    assert list(EpochShuffleSampler(5, seed=3, shuffle=False)) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------------ errors
def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_broken_json_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "d.jsonl", ['{"text": "a"}', "", '{"text": "b"', '{"text": "c"}'])
    with pytest.raises(DataError, match=r"d\.jsonl, line 3: not valid JSON"):
        encode_records(path, load_tokenizer(TINY / "tokenizer"))


def test_missing_text_field_names_line_and_key(tmp_path):
    path = write(tmp_path / "d.jsonl", ['{"text": "a"}', '{"prompt": "b"}'])
    with pytest.raises(DataError, match=r"line 2: field 'text' is missing.*keys found: prompt"):
        encode_records(path, load_tokenizer(TINY / "tokenizer"))


def test_non_object_line_and_empty_file(tmp_path):
    tok = load_tokenizer(TINY / "tokenizer")
    with pytest.raises(DataError, match="line 1: expected a JSON object, got list"):
        encode_records(write(tmp_path / "l.jsonl", ['["a"]']), tok)
    with pytest.raises(DataError, match="no documents"):
        encode_records(write(tmp_path / "e.jsonl", [""]), tok)


def test_missing_data_file_fails_at_construction(tmp_path):
    with pytest.raises(DataError, match=r"data\.path: file .*nope\.jsonl not found"):
        TextDataModule(str(tmp_path / "nope.jsonl"), str(TINY / "tokenizer"))


# ------------------------------------------------------------------------------------------ shipped files
def test_shipped_tokenizer_fits_the_tiny_preset_and_round_trips():
    tok = load_tokenizer(TINY / "tokenizer")
    assert tok.vocab_size <= ModelConfig.from_preset("tiny-deepseek-moe").vocab_size
    assert tok.tokenizer.id_to_token(tok.eos_id) == "<|endoftext|>"
    text = json.loads((TINY / "val.jsonl").read_text().splitlines()[0])["text"]
    (ids,) = tok.encode_batch([text])
    assert tok.decode(ids) == text and tok.eos_id not in ids


def test_shipped_data_is_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("make_tiny_data", REPO / "scripts" / "make_tiny_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = [json.loads(line)["text"] for line in (TINY / "train.jsonl").read_text().splitlines()]
    assert shipped == module.documents(len(shipped), seed=0)


def test_datamodule_batches(tmp_path):
    dm = TextDataModule(str(TINY / "val.jsonl"), str(TINY / "tokenizer"), seq_len=32, micro_batch_size=4, seed=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32)
    # labels agree with inputs wherever they are trained, and documents are separated by EOS
    trained = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][trained], batch["input_ids"][trained])
    assert int((batch["input_ids"] == dm.load_tokenizer().eos_id).sum()) > 0
