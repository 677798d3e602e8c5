"""DeepSeek-V3's auxiliary-loss-free balancing runs inside `moetrain fit`: the correction bias moves after
optimizer steps, is logged, and lands in the checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from moetrain.cli import main

REPO = Path(__file__).resolve().parents[2]
SPEED = 0.01


def test_fit_updates_logs_and_saves_the_correction_bias(tmp_path):
    run = tmp_path / "run"
    threads, cwd = torch.get_num_threads(), os.getcwd()
    os.chdir(REPO)  # the recipe names its data relative to the repository root
    try:
        code = main(["fit", "--config", "recipes/tiny.yaml", "--trainer.max_steps=3",
                     f"--trainer.default_root_dir={run}", "--trainer.enable_progress_bar=false",
                     "--model.preset=tiny-deepseek-v3", "--data.micro_batch_size=2", "--data.seq_len=64",
                     "--model.config=" + json.dumps({"vocab_size": 768, "num_hidden_layers": 2,
                                                     "bias_update_speed": SPEED})])
    finally:
        torch.set_num_threads(threads)
        os.chdir(cwd)
    assert code == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # every step moves each bias entry by exactly +-SPEED (or 0 where load equals the mean)
    # (the bias is fp32: SPEED up to fp32 rounding)
    assert abs(records[0]["balance/bias_abs_max"] - SPEED) < 1e-8
    assert records[-1]["balance/bias_abs_max"] <= 3 * SPEED + 1e-8
    ckpt = run / "checkpoints" / (run / "checkpoints" / "last").read_text().strip()
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    with safe_open(str(ckpt / index[name]), framework="pt") as f:
        bias = f.get_tensor(name)
    assert bias.dtype == torch.float32 and bias.abs().max().item() > 0
