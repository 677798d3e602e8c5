"""Bad data input: each case ends with an error naming the file, line and fix, or is skipped/truncated and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moetrain.cli import main
from moetrain.models.decoder import IGNORE_INDEX
from moetrain.training.data import DataError, TextDataModule
from moetrain.training.records import DataReport, encode_file
from moetrain.training.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
TINY_TOKENIZER = REPO / "data" / "tiny" / "tokenizer"
CHAT_TOKENIZER = REPO / "data" / "examples" / "tokenizer"  # ChatML markers are single tokens


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY_TOKENIZER)


CASES = [
    # (records, format, expected error text)
    ([{"prompt": "a", "completion": "b"}, '{"prompt": "c", "completion": '], "auto",
     r"bad\.jsonl, line 2: not valid JSON .*set data\.on_error: skip"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], "auto",
     r"bad\.jsonl, line 2: field 'completion' is missing; every instruction record needs a string 'completion' "
     r"field \(keys found: prompt\)"),
    ([{"prompt": "a", "completion": ""}], "instruction", r"line 1: field 'completion' is empty"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "auto", r"line 1: the conversation has no assistant message"),
    ([{"messages": [{"role": "user"}]}], "chat",
     r"line 1: message 0 must be an object with string 'role' and 'content'"),
    ([{"messages": []}], "chat", r"line 1: 'messages' must be a non-empty list"),
    ([{"input_ids": [1, 2, 5000]}], "auto",
     r"line 1: token id 5000 is outside the tokenizer's vocabulary of 683 ids \(0\.\.682\); the data was tokenized "
     r"with a different tokenizer"),
    ([{"input_ids": [1, 2], "labels": [1, 3]}], "pretokenized", r"line 1: 'labels' must equal 'input_ids' or be -100"),
    ([{"input_ids": [1, 2], "loss_mask": [1]}], "pretokenized", r"line 1: field 'loss_mask' must be a list of 0/1"),
    ([{"title": "x"}], "auto", r"line 1: cannot tell the data format from the keys \(title\)"),
    ([["a list"]], "auto", r"line 1: expected a JSON object, got list"),
    (["", "  "], "auto", r"bad\.jsonl: no documents; the file is empty"),
]


@pytest.mark.parametrize("records, fmt, message", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_record_stops_with_file_line_and_reason(tmp_path, tok, records, fmt, message):
    with pytest.raises(DataError, match=message):
        encode_file(write_lines(tmp_path / "bad.jsonl", records), tok, fmt)


def test_skip_counts_malformed_lines_and_keeps_the_rest(tmp_path, tok):
    path = write_lines(tmp_path / "mixed.jsonl", [{"text": "Tom is happy."}, "{oops", {"text": "Anna is calm."},
                                                  {"txt": "wrong key"}, [1, 2]])
    report = DataReport(str(path))
    docs = encode_file(path, tok, "text", on_error="skip", report=report)
    assert [tok.decode(ids) for ids, _ in docs] == ["Tom is happy.", "Anna is calm."]
    assert [line for line, _ in report.skipped] == [2, 4, 5]
    assert "3 malformed lines skipped (lines 2, 4, 5; first: not valid JSON" in report.summary()


def test_json_error_reads_as_one_sentence(tmp_path, tok):
    # json's own message is "Invalid control character at" (it expects a position after it)
    path = write_lines(tmp_path / "tab.jsonl", [{"text": "Tom is happy."}, '{"text": "a\tb"}'])
    with pytest.raises(DataError) as caught:
        encode_file(path, tok, "text")
    message = str(caught.value)
    assert "line 2: not valid JSON (Invalid control character at column 12)" in message
    assert " at at " not in " ".join(message.split())


def test_skip_report_does_not_advise_setting_skip(tmp_path, tok):
    path = write_lines(tmp_path / "mixed.jsonl", [{"text": "Tom is happy."}, "{oops"])
    report = DataReport(str(path))
    encode_file(path, tok, "text", on_error="skip", report=report)
    assert "1 malformed lines skipped (lines 2; first: not valid JSON" in report.summary()
    assert "on_error" not in report.summary()
    with pytest.raises(DataError, match=r"line 2: not valid JSON .*set data\.on_error: skip"):
        encode_file(path, tok, "text")  # under raise the hint stays


def test_all_lines_skipped_is_an_empty_dataset(tmp_path, tok):
    path = write_lines(tmp_path / "junk.jsonl", ["{oops", "[1]"])
    with pytest.raises(DataError, match=r"junk\.jsonl: no documents \(all 2 non-blank lines were malformed and "
                                        r"skipped\)"):
        encode_file(path, tok, on_error="skip")


@pytest.mark.parametrize("packing", [True, False])
def test_overlong_documents_are_truncated_and_counted(tmp_path, packing):
    long_text = " ".join(["Tom went to the park with a red dog."] * 6)  # about 60 tokens
    path = write_lines(tmp_path / "long.jsonl", [{"text": long_text}, {"text": "Anna is calm."}] * 4)
    dm = TextDataModule(str(path), str(TINY_TOKENIZER), seq_len=16, micro_batch_size=1, packing=packing,
                        shuffle=False)
    dm.setup("fit")
    report = dm.reports["train"]
    assert report.truncated == 4 and "4 truncated to seq_len" in report.summary()
    first = dm.train_set[0]
    assert first["input_ids"].shape == (16,)
    # the cut document fills the row; its last token (the separator EOS) is not taught as an end of text
    assert first["labels"][-1].item() == IGNORE_INDEX
    assert (first["labels"][1:-1] != IGNORE_INDEX).all()


def test_split_needs_packing_and_options_are_checked(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"text": "a"}])
    for kwargs, message in ((dict(packing=False, overlong="split"), r"data\.overlong='split'.*needs data\.packing"),
                            (dict(format="csv"), r"data\.format='csv': choose one of auto, text"),
                            (dict(on_error="ignore"), r"data\.on_error='ignore': choose one of raise, skip"),
                            (dict(val_split=0.1, val_path=str(path)), "set data.val_path or data.val_split, not both"),
                            (dict(val_split=1.5), r"data\.val_split must be in \[0, 1\)")):
        with pytest.raises(DataError, match=message):
            TextDataModule(str(path), str(TINY_TOKENIZER), **kwargs)


def test_tokenizer_larger_than_the_model_vocabulary_is_a_clear_error(tmp_path, capsys):
    code = main(["fit", "--config", str(REPO / "recipes" / "tiny.yaml"), "--model.config.vocab_size=256",
                 f"--data.path={REPO / 'data' / 'tiny' / 'val.jsonl'}", f"--data.tokenizer={TINY_TOKENIZER}",
                 "--data.val_path=null", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert "has 683 tokens but the model's vocab_size is 256" in err and "model.config.vocab_size >= 683" in err


def test_conversations_cut_before_their_answer_are_dropped_and_counted(tmp_path):
    long_question = {"role": "user", "content": " ".join(["What is two plus two?"] * 8)}
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    long = {"messages": [long_question, {"role": "assistant", "content": "Four."}]}
    path = write_lines(tmp_path / "chat.jsonl", [long, {"messages": short}] * 3)
    dm = TextDataModule(str(path), str(CHAT_TOKENIZER), seq_len=40, micro_batch_size=1, packing=False)
    dm.setup("fit")
    report = dm.reports["train"]
    assert (report.truncated, report.untrained, report.documents) == (3, 3, 3)
    assert "3 truncated to seq_len, 3 of those dropped (no trained token left)" in report.summary()
    assert all((row["labels"] != IGNORE_INDEX).any() for row in dm.train_set)
    only_long = write_lines(tmp_path / "long.jsonl", [long])
    with pytest.raises(DataError, match=r"long\.jsonl: every document loses all its trained tokens when truncated to "
                                        r"data\.seq_len=40; raise data\.seq_len"):
        TextDataModule(str(only_long), str(CHAT_TOKENIZER), seq_len=40, packing=False).setup("fit")
