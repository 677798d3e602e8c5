"""``moetrain select-experts``: reproducible selection files, scores equal to the library's over the same sample,
the table and heatmap, bad input, and the ESFT recipe's two commands (select, then fit)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import moetrain
from moetrain.cli import main as cli_main
from moetrain.models.random_hf import preset_config, write_random_hf
from moetrain.models.train_selection import load_expert_selection
from moetrain.routing_stats import RoutingStats, collect_routing_stats, select_by_coverage
from moetrain.select_experts import main, sample_batches
from moetrain.training.data import TextDataModule

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "tiny"
SEQ = 64
# the recipe fine-tunes on data/esft_task; these tests measure the toy corpus (text format)
TOY_DATA = ["--data.path=data/tiny/train.jsonl", "--data.val_path=data/tiny/val.jsonl",
            "--data.tokenizer=data/tiny/tokenizer", "--data.format=text"]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A random 3-layer tiny DeepSeek-MoE model directory (fp32), the --ckpt of these tests."""
    out = tmp_path_factory.mktemp("base") / "tiny"
    write_random_hf(preset_config("tiny-deepseek-moe", layers=3, overrides={"vocab_size": 768}), out, dtype="fp32",
                    seed=5)
    return out


def select(out: Path, base: Path, *extra: str) -> int:
    return main(["--config", str(REPO / "recipes" / "tiny-esft.yaml"), "--ckpt", str(base), "--tokens", "1500",
                 "--out", str(out), f"--data.seq_len={SEQ}", *TOY_DATA, *extra])


def test_selection_is_reproducible_from_the_same_data_and_seed(tmp_path, base_model, repo_cwd, capsys):
    assert select(tmp_path / "a" / "sel.json", base_model, "--seed", "3") == 0
    printed = capsys.readouterr().out
    assert select(tmp_path / "b" / "sel.json", base_model, "--seed", "3") == 0
    for name in ("sel.json", "sel.stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "sel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert select(tmp_path / "c" / "sel.json", base_model, "--seed", "4") == 0
    a, c = (json.loads((tmp_path / d / "sel.json").read_text()) for d in "ac")
    assert a["tokens_sha256"] != c["tokens_sha256"] and a["data_sha256"] == c["data_sha256"]
    assert a["data_sha256"] == hashlib.sha256((DATA / "train.jsonl").read_bytes()).hexdigest()
    assert a["tokens"] == 1500 and a["score"] == "gate" and a["top_p"] == 0.2 and a["seed"] == 3
    # the table: one row per MoE layer and the total
    lines = printed.splitlines()
    assert lines[0].split()[:3] == ["layer", "selected", "covers"]
    assert [line.split()[0] for line in lines[1:3]] == ["1", "2"]
    assert lines[3].startswith(f"total  {a['selected']} of 32 routed experts")


@pytest.mark.parametrize("score", ["gate", "token"])
def test_scores_and_selection_equal_the_library_on_the_same_sample(tmp_path, base_model, repo_cwd, score):
    out = tmp_path / "sel.json"
    assert select(out, base_model, "--seed", "1", "--score", score, "--top_p", "0.5", "--batch_size", "3") == 0
    data = TextDataModule(path="data/tiny/train.jsonl", tokenizer="data/tiny/tokenizer", seq_len=SEQ,
                          micro_batch_size=8)
    data.prepare("fit")
    model = moetrain.from_pretrained(base_model)
    expected = collect_routing_stats(model, sample_batches(data.train_set, batch_size=3, seed=1), max_tokens=1500,
                                     progress=False)
    saved = RoutingStats.load(tmp_path / "sel.stats.json")
    assert saved.tokens == expected.tokens == 1500
    for layer in expected.layers:
        assert torch.equal(saved.gate_score[layer], expected.gate_score[layer])
        assert torch.equal(saved.token_ratio[layer], expected.token_ratio[layer])
    record = json.loads(out.read_text())
    chosen = select_by_coverage(expected.scores(score), 0.5)
    assert load_expert_selection(out) == chosen
    assert record["scores"] == {str(k): v.tolist() for k, v in expected.scores(score).items()}
    assert record["selected"] == sum(len(v) for v in chosen.values()) < 32


def test_sample_batches_is_a_seeded_permutation():
    rows = [{"input_ids": torch.full((4,), i), "labels": torch.full((4,), i)} for i in range(7)]
    first = [b["input_ids"][:, 0].tolist() for b in sample_batches(rows, batch_size=3, seed=9)]
    again = [b["input_ids"][:, 0].tolist() for b in sample_batches(rows, batch_size=3, seed=9)]
    other = [b["input_ids"][:, 0].tolist() for b in sample_batches(rows, batch_size=3, seed=10)]
    assert first == again != other
    assert [len(b) for b in first] == [3, 3, 1] and sorted(sum(first, [])) == list(range(7))
    assert "labels" not in next(sample_batches(rows, batch_size=3, seed=9))


@pytest.mark.parametrize("args, needle", [
    (["--top_p", "0"], "--top_p 0.0: need 0 < --top_p <= 1"),
    (["--tokens", "0"], "--tokens 0"),
    (["--data", "no/such.jsonl"], "no/such.jsonl not found"),
    (["--data.no_such_key=1"], "no_such_key"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, tmp_path, base_model, repo_cwd, capsys):
    assert select(tmp_path / "sel.json", base_model, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("moetrain select-experts: error:") and needle in err and "Traceback" not in err
    assert not (tmp_path / "sel.json").exists()


def test_the_esft_recipe_selects_then_fits(tmp_path, base_model, repo_cwd, capsys):
    """The recipe header's two commands: select-experts writes the recipe's model.train.routed_experts, and fit
    trains exactly those experts."""
    out = tmp_path / "experts.json"
    overrides = [f"--model.init_from={base_model}", f"--model.train.routed_experts={out}"]
    assert main(["--config", "recipes/tiny-esft.yaml", "--tokens", "1000", f"--data.seq_len={SEQ}",
                 *overrides]) == 0  # no --out: the recipe's routed_experts
    chosen = load_expert_selection(out)
    run = tmp_path / "run"
    assert cli_main(["fit", "--config", "recipes/tiny-esft.yaml", *overrides, "--trainer.max_steps=2",
                     f"--data.seq_len={SEQ}", "--data.micro_batch_size=2", f"--trainer.default_root_dir={run}"]) == 0
    start, trained = moetrain.from_pretrained(base_model), moetrain.from_pretrained(run)
    before = dict(start.named_parameters())
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, before[n])}
    expected = {f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for layer, ids in chosen.items() for e in ids
                for proj in ("gate_proj", "up_proj", "down_proj")}
    assert changed <= expected and len(changed) >= len(expected) // 2  # a chosen expert may get no token in 2 steps


def test_a_model_that_does_not_fit_is_measured_layer_by_layer(tmp_path, base_model, repo_cwd, capsys, monkeypatch):
    """--stream auto runs one decoder layer at a time when the weights do not fit the device (here: a host with
    1 MiB available), and writes the same files, to the byte, as the whole model on the device (--stream off)."""
    assert select(tmp_path / "whole" / "sel.json", base_model, "--stream", "off", "--seed", "2") == 0
    assert "layer at a time" not in capsys.readouterr().err
    monkeypatch.setattr("moetrain.select_experts._host_available", lambda: 2**20)
    assert select(tmp_path / "streamed" / "sel.json", base_model, "--seed", "2") == 0
    err = capsys.readouterr().err
    assert "one decoder layer at a time (its 5.1 MiB of weights do not fit the 1.0 MiB free on cpu)" in err
    assert "routed experts of 1 layer at a time" in err
    for name in ("sel.json", "sel.stats.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes(), name
    monkeypatch.undo()
    assert select(tmp_path / "on" / "sel.json", base_model, "--stream", "on", "--seed", "2") == 0
    assert "(--stream on)" in capsys.readouterr().err
    assert (tmp_path / "whole" / "sel.json").read_bytes() == (tmp_path / "on" / "sel.json").read_bytes()


def test_streaming_needs_a_model_directory(tmp_path, repo_cwd, capsys):
    assert main(["--config", "recipes/tiny-esft.yaml", "--model.init_from=null", "--stream", "on", "--tokens", "100",
                 "--out", str(tmp_path / "sel.json"), f"--data.seq_len={SEQ}", *TOY_DATA]) == 2
    assert "--stream on needs a model directory" in capsys.readouterr().err
