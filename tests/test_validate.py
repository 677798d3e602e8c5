"""``moetrain validate`` scores real weights only: a checkpoint (``--ckpt_path``) or ``model.init_from``. Without
either it would score the preset's random initialisation, so it refuses; a ``--ckpt_path`` that does not exist
says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moetrain.cli import main
from moetrain.config import ConfigError, ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf import export_hf, resolve_checkpoint
from moetrain.training.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "data" / "tiny"


def _validate(tmp_path: Path, *overrides: str) -> int:
    threads = torch.get_num_threads()  # the recipe's cpu_threads: 1 would outlive the call
    try:
        return main(["validate", "--config", str(REPO / "recipes" / "tiny.yaml"),
                     f"--trainer.default_root_dir={tmp_path / 'run'}", f"--data.path={TINY / 'train.jsonl'}",
                     f"--data.val_path={TINY / 'val.jsonl'}", f"--data.tokenizer={TINY / 'tokenizer'}",
                     "--trainer.limit_val_batches=1", *overrides])
    finally:
        torch.set_num_threads(threads)


def test_validate_without_weights_is_refused(tmp_path, capsys):
    assert _validate(tmp_path) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no weights to score" in err and "--ckpt_path" in err and "--model.init_from" in err
    assert "random initialisation" in err and "Traceback" not in err


def test_validate_scores_init_from_without_a_checkpoint(tmp_path, capsys):
    """model.init_from names the weights: validate runs, and scores them, not a random initialisation."""
    model = MoEForCausalLM(ModelConfig.from_preset("tiny-deepseek-moe", vocab_size=768))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform predictions: the perplexity is exactly the vocabulary size
    export_hf(model, tmp_path / "hf")
    assert _validate(tmp_path, f"--model.init_from={tmp_path / 'hf'}", "--model.config=null") == 0
    out = capsys.readouterr().out
    val_ppl = float(next(line for line in out.splitlines() if "val_ppl" in line).split("│")[2])
    assert val_ppl == pytest.approx(768, rel=1e-4)  # a random head would not be uniform


def test_missing_ckpt_path_says_it_does_not_exist(tmp_path, capsys):
    assert _validate(tmp_path, f"--ckpt_path={tmp_path / 'runs' / 'typo'}") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{tmp_path / 'runs' / 'typo'} does not exist" in err and "moetrain_config.json" not in err
    # a 'last' pointer naming a checkpoint that was deleted
    run = tmp_path / "run"
    save_checkpoint(run, 3, MoEForCausalLM(ModelConfig.from_preset("tiny-olmoe")))
    assert resolve_checkpoint("last", run) == run / "checkpoints" / "step-3"
    assert resolve_checkpoint(run, tmp_path) == run / "checkpoints" / "step-3"  # a run directory
    (run / "checkpoints" / "last").write_text("step-7\n")
    with pytest.raises(ConfigError, match="names 'step-7'.*does not exist"):
        resolve_checkpoint("last", run)
