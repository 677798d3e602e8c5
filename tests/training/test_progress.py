"""The step progress bar: quiet when stderr is not a terminal, loss, tokens/s and step count when shown."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moetrain.cli import main
from moetrain.training.progress import progress_iter

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


def test_progress_iter_yields_everything_with_or_without_a_bar(capsys):
    items = list(range(7))
    assert list(progress_iter(items, total=7, desc="save", enabled=False)) == items
    assert capsys.readouterr().err == ""
    assert list(progress_iter(items, total=7, desc="save", enabled=True)) == items
    assert "save" in capsys.readouterr().err


def _small_model():
    from moetrain.config import ModelConfig
    from moetrain.models.decoder import MoEForCausalLM

    return MoEForCausalLM(ModelConfig.from_preset(
        "tiny-deepseek-moe", vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, num_experts=4, moe_intermediate_size=16))


def test_checkpoint_save_load_and_export_show_bars_when_enabled_and_nothing_off_a_terminal(tmp_path, capsys):
    """Forced on: a save draws a byte bar, a load and an export a per-shard bar (out of the index's shard
    count). Left to the terminal check under pytest's captured stderr: not one character, same tensors."""
    import json

    import torch
    from tqdm import tqdm

    from moetrain.models.hf import export_main
    from moetrain.training.checkpoint import load_model, save_checkpoint
    from moetrain.training.progress import forced

    model = _small_model()
    capsys.readouterr()
    with forced(True):
        ckpt = save_checkpoint(tmp_path / "on", 3, model, max_shard_bytes=20_000)
        saved = capsys.readouterr().err
        loaded = load_model(ckpt)
        loading = capsys.readouterr().err
        assert export_main([str(ckpt), str(tmp_path / "hf")]) == 0
        exporting = capsys.readouterr().err
    shards = len(set(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert shards > 2  # several shards, so that a per-shard bar has something to count
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # fp32, untied
    assert "save step-3" in saved and f"/{tqdm.format_sizeof(total, divisor=1024)}" in saved and "B/s" in saved
    assert "load step-3" in loading and f"/{shards}" in loading and "shard" in loading
    assert "load step-3" in exporting
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(),
                                                 strict=True))

    ckpt = save_checkpoint(tmp_path / "off", 3, model, max_shard_bytes=20_000)
    load_model(ckpt)
    assert export_main([str(ckpt), str(tmp_path / "hf-off")]) == 0
    assert capsys.readouterr().err == ""
