"""The step progress bar: quiet when stderr is not a terminal, loss, tokens/s and step count when shown."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moetrain.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("enabled", [None, True])
def test_step_bar_is_quiet_off_a_terminal_and_shows_loss_when_on(enabled, tmp_path, capsys):
    args = ["fit", "--config", str(REPO / "recipes" / "tiny.yaml"), f"--trainer.default_root_dir={tmp_path}",
            f"--data.path={REPO / 'data' / 'tiny' / 'train.jsonl'}", f"--data.tokenizer={REPO / 'data/tiny/tokenizer'}",
            "--data.val_path=null", "--data.seq_len=64", "--trainer.max_steps=3", "--checkpoint.save_final=false"]
    if enabled is not None:
        args.append(f"--progress.enabled={str(enabled).lower()}")
    assert main(args) == 0
    err = capsys.readouterr().err
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    if enabled is None:  # pytest's captured stderr is not a terminal
        assert "fit:" not in err and "step/s" not in err and "it/s" not in err
    else:
        final = err.replace("\r", "\n").strip().splitlines()
        shown = [line for line in final if line.startswith("fit: 100%")][-1]
        assert "3/3" in shown and f"loss={last['loss']:.4f}" in shown
        assert re.search(r"tok/s=\d+", shown)
