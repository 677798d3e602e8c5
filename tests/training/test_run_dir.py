"""One run per run directory: ``moetrain fit`` again into a used directory is refused (exit 2, before the model is
built, nothing touched) with the ways on; ``--overwrite_run=true`` starts again cleanly; a resume from an earlier
checkpoint replaces the lines of the steps after it instead of adding a second copy of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moetrain.cli import main
from moetrain.training.module import MoETrainingModule

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "tiny"
SMALL = {"vocab_size": 768, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 4, "moe_intermediate_size": 16}


def fit(run_dir: Path, *args: str) -> int:
    threads = torch.get_num_threads()
    try:
        return main(["fit", "--config", str(ROOT / "recipes" / "tiny.yaml"), "--trainer.accelerator=cpu",
                     f"--model.config={json.dumps(SMALL)}", f"--data.path={DATA / 'val.jsonl'}",
                     f"--data.tokenizer={DATA / 'tokenizer'}", "--data.seq_len=32", "--data.micro_batch_size=2",
                     f"--trainer.default_root_dir={run_dir}", *args])
    finally:
        torch.set_num_threads(threads)  # the recipe's cpu_threads must not leak into other tests


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*")
            if p.is_file() and p.name != "config.yaml"}


@pytest.fixture(scope="module")
def used(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("used") / "run"
    assert fit(run, "--trainer.max_steps=3", "--checkpoint.every_n_steps=2") == 0
    assert steps(run) == [1, 2, 3] and (run / "checkpoints" / "last").read_text().strip() == "step-3"
    return run


def test_second_fit_into_a_used_run_dir_is_refused(used, monkeypatch, capsys):
    before = snapshot(used)
    built = []
    build = MoETrainingModule._build_model
    monkeypatch.setattr(MoETrainingModule, "_build_model", lambda self, *a: built.append(1) or build(self, *a))
    capsys.readouterr()
    assert fit(used, "--trainer.max_steps=3") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("moetrain: error:") and "Traceback" not in err
    # names the directory and what it holds, and every way on
    assert f"trainer.default_root_dir={used}" in err and "up to step 3" in err and "step-3" in err
    assert "--ckpt_path=last" in err and "--trainer.default_root_dir=DIR" in err and "--overwrite_run=true" in err
    assert not built, "the refusal must come before the model is built"
    assert snapshot(used) == before, "a refused fit must not touch the run directory"


def test_overwrite_run_starts_again(used, tmp_path):
    run = tmp_path / "again"
    import shutil

    shutil.copytree(used, run)
    assert fit(run, "--trainer.max_steps=2", "--overwrite_run=true") == 0
    assert steps(run) == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last", "step-2"]
    assert fit(run, "--trainer.max_steps=2", "--overwrite_run=true", "--ckpt_path=last") == 2  # contradictory


def test_resume_from_an_earlier_checkpoint_replaces_later_lines(used, tmp_path):
    """The run went on to step 3 after its step-2 checkpoint; resuming from step 2 (as after a crash between
    the two) writes steps 3.. again, once, and the same values as the first time."""
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(used, run)
    first = (run / "metrics.jsonl").read_text().splitlines()
    assert fit(run, "--trainer.max_steps=3", f"--ckpt_path={run / 'checkpoints' / 'step-2'}") == 0
    assert steps(run) == [1, 2, 3]
    again = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [{k: r[k] for k in ("step", "loss", "tokens")} for r in again] == [
        {k: r[k] for k in ("step", "loss", "tokens")} for r in map(json.loads, first)]
