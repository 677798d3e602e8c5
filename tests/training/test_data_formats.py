"""Every data format: the token ids equal the tokenizer's, and the loss mask trains exactly the completion or
assistant tokens (checked against transformers' chat rendering and a decode-prefix reference); padding keeps
the model's outputs and auxiliary loss equal to the unpadded document's; the validation split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moetrain.config import ModelConfig
from moetrain.models.decoder import IGNORE_INDEX, MoEForCausalLM
from moetrain.training.chat import ChatTemplate, default_template
from moetrain.training.data import TextDataModule, pad_documents, split_validation
from moetrain.training.records import DataReport, encode_file
from moetrain.training.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "data" / "examples"
TINY_TOKENIZER = REPO / "data" / "tiny" / "tokenizer"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def decode_prefix_mask(tokenizer, ids: list[int], trained_from: int) -> list[bool]:
    """Reference mask: token t is trained when the text decoded before it already covers ``trained_from`` chars."""
    return [len(tokenizer.decode(ids[:t])) >= trained_from for t in range(len(ids))]


def test_instruction_trains_only_the_completion(tmp_path):
    tok = load_tokenizer(TINY_TOKENIZER)
    pairs = [{"prompt": "Question: What is two plus two?\nAnswer:", "completion": " Two plus two is four."},
             {"prompt": "Tom went to the park.", "completion": " He met Anna there."}]
    report = DataReport("x")
    docs = encode_file(write_jsonl(tmp_path / "i.jsonl", pairs), tok, "auto", report=report)
    assert report.format == "instruction" and report.documents == 2
    for (ids, mask), pair in zip(docs, pairs, strict=True):
        assert ids == tok.encode_batch([pair["prompt"] + pair["completion"]])[0]
        assert mask == decode_prefix_mask(tok, ids, len(pair["prompt"]))
        assert 0 < sum(mask) < len(mask)
        assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == pair["completion"]


def test_chat_template_renders_like_transformers_and_trains_assistant_turns():
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(EXAMPLES / "tokenizer")
    template = ChatTemplate.from_tokenizer_dir(EXAMPLES / "tokenizer")
    assert template.source.endswith("tokenizer_config.json")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(EXAMPLES / "tokenizer"))
    records = [json.loads(line) for line in (EXAMPLES / "chat.jsonl").read_text().splitlines()[:20]]
    docs = encode_file(EXAMPLES / "chat.jsonl", tok, "chat")[:20]
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) == 2 for r in records)  # multi-turn covered
    for record, (ids, mask) in zip(records, docs, strict=True):
        messages = record["messages"]
        text = hf.apply_chat_template(messages, tokenize=False)
        assert template.render(messages) == text
        assert ids == hf(text, add_special_tokens=False)["input_ids"]
        trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
        assert trained == "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant")
        prompt = hf.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        assert template.render(messages[:-1], add_generation_prompt=True) == prompt


def test_default_template_is_chatml_when_the_tokenizer_has_none(tmp_path):
    template = ChatTemplate.from_tokenizer_dir(TINY_TOKENIZER)
    assert template.source == "default"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\nHello.<|im_end|>\n")
    assert template.render(messages) == default_template(messages) == expected
    text, spans = template.render_with_spans(messages)
    assert [text[s:e] for s, e in spans] == ["Hello.<|im_end|>\n"]
    # a tokenizer with its own template can still be told to use the default
    assert ChatTemplate.from_tokenizer_dir(EXAMPLES / "tokenizer", use_template=False).source == "default"


def test_pretokenized_labels_loss_mask_and_plain_ids(tmp_path):
    tok = load_tokenizer(TINY_TOKENIZER)
    records = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
               {"input_ids": [9, 10, 11], "loss_mask": [0, 1, 1]},
               {"input_ids": [12, 13]}]
    docs = encode_file(write_jsonl(tmp_path / "p.jsonl", records), tok)
    assert docs == [([5, 6, 7, 8], [False, False, True, True]), ([9, 10, 11], [False, True, True]),
                    ([12, 13], [True, True])]


def test_padding_row_equals_the_document_alone_and_aux_loss_ignores_padding():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, aux_loss="switch",
                      aux_loss_coef=0.1)
    model = MoEForCausalLM(cfg).eval()
    docs = [([3, 4, 5, 6, 7], [False, False, True, True, True]), ([8, 9, 10], [True, True, True])]
    rows = pad_documents(docs, seq_len=9, eos_id=1)
    assert rows["attention_mask"].tolist() == [[1] * 6 + [0] * 3, [1] * 4 + [0] * 5]
    assert rows["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7, 1] + [IGNORE_INDEX] * 3
    with torch.no_grad():
        for i, (ids, _) in enumerate(docs):
            row = {k: v[i: i + 1] for k, v in rows.items()}
            padded = model(row["input_ids"], attention_mask=row["attention_mask"], position_ids=row["position_ids"])
            alone = model(torch.tensor([ids + [1]]))
            n = len(ids) + 1
            torch.testing.assert_close(padded.logits[0, :n], alone.logits[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(padded.aux_loss, alone.aux_loss, rtol=1e-5, atol=1e-6)


def test_validation_split_is_seeded_disjoint_and_complete():
    docs = [([i], [True]) for i in range(50)]
    train, val = split_validation(docs, 0.1, seed=3)
    assert len(val) == 5 and len(train) == 45
    assert sorted(train + val) == sorted(docs)
    assert split_validation(docs, 0.1, seed=3) == (train, val)
    assert split_validation(docs, 0.1, seed=4)[1] != val


@pytest.mark.parametrize("packing", [True, False])
def test_data_module_chat_rows_and_report(packing, capsys):
    dm = TextDataModule(str(EXAMPLES / "chat.jsonl"), str(EXAMPLES / "tokenizer"), seq_len=64, micro_batch_size=4,
                        val_split=0.05, packing=packing)
    dm.setup("fit")
    train, val = dm.reports["train"], dm.reports["val"]
    assert train.format == "chat" and train.documents + val.documents == 1200 and val.documents == 60
    assert f"data (train): {train.summary()}" in capsys.readouterr().err
    batch = next(iter(dm.train_dataloader()))
    # packed rows bring their documents' spans, computed in host memory (moetrain.models.varlen.with_spans)
    keys = {"input_ids", "labels", "position_ids"} | (
        {"document_ids", "cu_seqlens", "max_document_len"} if packing else {"attention_mask"})
    assert set(batch) == keys and batch["input_ids"].shape == (4, 64)
    trained = (batch["labels"] != IGNORE_INDEX).sum().item()
    assert 0 < trained < batch["input_ids"].numel()
    if not packing:
        assert train.rows == train.documents
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
