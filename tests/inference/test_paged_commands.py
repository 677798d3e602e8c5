"""``moetrain generate --expert_weights paged`` prints what resident generation prints, with the cache's
telemetry on stderr; ``moetrain validate`` with the :class:`PagedValidation` callback scores what resident
validation scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moetrain.cli import main
from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf import export_hf

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "data" / "tiny"


@pytest.fixture
def tiny_dir(tmp_path, randomize) -> Path:
    model = randomize(MoEForCausalLM(ModelConfig.from_preset("tiny-deepseek-moe", vocab_size=768)))
    export_hf(model, tmp_path / "hf")
    return tmp_path / "hf"


def _telemetry(err: str) -> dict:
    line = next(line for line in err.splitlines() if line.startswith("paged experts: "))
    return json.loads(line.removeprefix("paged experts: "))


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_generate_paged_prints_the_resident_text(tiny_dir, policy, capsys):
    common = ["generate", "--ckpt", str(tiny_dir), "--tokenizer", str(TINY / "tokenizer"), "--prompt",
              "Once upon a time", "--max_new_tokens", "12"]
    assert main(common) == 0
    resident = capsys.readouterr().out
    assert main([*common, "--expert_weights", "paged", "--cache_slots", "12", "--cache_policy", policy]) == 0
    captured = capsys.readouterr()
    assert captured.out == resident
    report = _telemetry(captured.err)
    assert report["cache_slots"] == 12 and report["total_experts"] == 48 and report["cache_policy"] == policy
    assert 0 <= report["hit_rate"] <= 1 and 0 < report["ideal_static_hit_rate"] <= 1
    assert report["bytes_paged_per_token"] > 0 and report["decode_tokens_per_s"] > 0


def test_generate_refuses_paging_options_without_paged_experts(tiny_dir, capsys):
    assert main(["generate", "--ckpt", str(tiny_dir), "--tokenizer", str(TINY / "tokenizer"), "--prompt", "x",
                 "--expert_dtype", "int8"]) == 2
    assert "expert_weights=paged" in capsys.readouterr().err


def _validate(tmp_path: Path, model_dir: Path, *extra: str) -> int:
    return main(["validate", "--config", str(REPO / "recipes" / "tiny.yaml"),
                 f"--trainer.default_root_dir={tmp_path / 'run'}", f"--data.path={TINY / 'train.jsonl'}",
                 f"--data.val_path={TINY / 'val.jsonl'}", f"--data.tokenizer={TINY / 'tokenizer'}",
                 "--trainer.limit_val_batches=2", f"--model.init_from={model_dir}", "--model.config=null", *extra])


def _val_loss(out: str) -> float:
    return float(next(line for line in out.splitlines() if " val_loss " in line).split("│")[2])


def test_validate_with_paged_experts_scores_what_resident_validation_scores(tiny_dir, tmp_path, capsys):
    assert _validate(tmp_path, tiny_dir) == 0
    resident = _val_loss(capsys.readouterr().out)
    assert _validate(tmp_path, tiny_dir, "--trainer.callbacks+=moetrain.inference.validation.PagedValidation",
                     "--trainer.callbacks.cache_slots=10", "--trainer.callbacks.cache_policy=lfu") == 0
    captured = capsys.readouterr()
    assert _val_loss(captured.out) == pytest.approx(resident, abs=1e-6)
    report = _telemetry(captured.err)
    assert report["cache_slots"] == 10 and report["hit_rate"] < 1 and report["bytes_paged_per_token"] > 0
