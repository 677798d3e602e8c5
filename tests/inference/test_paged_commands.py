"""``moetrain generate --expert_weights paged`` prints what resident generation prints, with the cache's
telemetry on stderr; ``moetrain validate --model.inference.expert_weights=paged`` builds the model with its
experts in host memory (from ``model.init_from`` or ``--ckpt_path``, from host rows or from the shards) and
scores what resident validation scores; fit refuses paged experts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import moetrain.inference.validation as paged_validation
from moetrain.cli import main
from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf import export_hf
from moetrain.training.checkpoint import save_checkpoint

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


@pytest.mark.parametrize("policy, source", [("lru", "host"), ("lfu", "host"), ("lru", "shards")])
def test_generate_paged_prints_the_resident_text(tiny_dir, policy, source, capsys):
    common = ["generate", "--ckpt", str(tiny_dir), "--tokenizer", str(TINY / "tokenizer"), "--prompt",
              "Once upon a time", "--max_new_tokens", "12"]
    assert main(common) == 0
    resident = capsys.readouterr().out
    assert main([*common, "--expert_weights", "paged", "--cache_slots", "12", "--cache_policy", policy,
                 "--expert_source", source]) == 0
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


def _validate(tmp_path: Path, *extra: str, limit: int = 2) -> int:
    return main(["validate", "--config", str(REPO / "recipes" / "tiny.yaml"),
                 f"--trainer.default_root_dir={tmp_path / 'run'}", f"--data.path={TINY / 'train.jsonl'}",
                 f"--data.val_path={TINY / 'val.jsonl'}", f"--data.tokenizer={TINY / 'tokenizer'}",
                 f"--trainer.limit_val_batches={limit}", *extra])


def _val_loss(out: str) -> float:
    return float(next(line for line in out.splitlines() if " val_loss " in line).split("│")[2])


PAGED = ("--model.inference.expert_weights=paged", "--model.inference.cache_slots=10",
         "--model.inference.cache_policy=lfu")


@pytest.fixture
def built(monkeypatch) -> list:
    """The models ``moetrain validate`` builds with paged experts (to look at what they hold)."""
    models = []
    build = paged_validation.build_paged_model

    def spy(*args, **kwargs):
        models.append(build(*args, **kwargs))
        return models[-1]

    monkeypatch.setattr(paged_validation, "build_paged_model", spy)
    return models


@pytest.mark.parametrize("source", ["host", "shards"])
def test_validate_with_paged_experts_scores_what_resident_validation_scores(tiny_dir, tmp_path, capsys, built,
                                                                             source):
    init = (f"--model.init_from={tiny_dir}", "--model.config=null")
    assert _validate(tmp_path, *init) == 0
    resident = _val_loss(capsys.readouterr().out)
    assert _validate(tmp_path, *init, *PAGED, f"--model.inference.expert_source={source}") == 0
    captured = capsys.readouterr()
    assert _val_loss(captured.out) == pytest.approx(resident, abs=1e-6)
    report = _telemetry(captured.err)
    assert report["cache_slots"] == 10 and report["expert_source"] == source
    assert report["hit_rate"] < 1 and report["bytes_paged_per_token"] > 0
    (model,) = built
    assert not any(".mlp.experts." in name for name in model.state_dict())  # never allocated beside the dense part


@pytest.mark.parametrize("source", ["host", "shards"])
def test_validate_pages_a_checkpoint_into_a_model_built_without_expert_weights(tmp_path, capsys, built, randomize,
                                                                                source):
    """``--ckpt_path``: the recipe's shape is built with no expert row anywhere, then the checkpoint's experts go
    straight into host memory; the loss is the resident model's."""
    model = randomize(MoEForCausalLM(ModelConfig.from_preset("tiny-deepseek-moe", vocab_size=768)))
    save_checkpoint(tmp_path / "trained", 7, model)
    ckpt = f"--ckpt_path={tmp_path / 'trained'}"
    assert _validate(tmp_path, ckpt) == 0
    resident = _val_loss(capsys.readouterr().out)
    assert _validate(tmp_path, ckpt, *PAGED, f"--model.inference.expert_source={source}") == 0
    captured = capsys.readouterr()
    assert _val_loss(captured.out) == pytest.approx(resident, abs=1e-6)
    report = _telemetry(captured.err)
    assert report["total_experts"] == 3 * 16 and report["expert_source"] == source  # layer 0 is dense
    assert not any(".mlp.experts." in name for name in built[0].state_dict())


def test_fit_refuses_paged_experts(tmp_path, capsys):
    assert main(["fit", "--config", str(REPO / "recipes" / "tiny.yaml"), f"--trainer.default_root_dir={tmp_path}",
                 f"--data.path={TINY / 'train.jsonl'}", f"--data.tokenizer={TINY / 'tokenizer'}",
                 "--trainer.max_steps=1", *PAGED]) == 2
    assert "is for validate" in capsys.readouterr().err
