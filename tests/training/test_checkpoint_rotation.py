"""``checkpoint.keep_last``: only the newest checkpoints stay, never the one ``last`` names; stale ``.tmp`` goes."""

from __future__ import annotations

import torch
from ckpt_harness import SMALL_MODEL

from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.training.checkpoint import load_model, save_checkpoint


def test_keep_last_rotates_and_cleans_stale_tmp(tmp_path):
    model = MoEForCausalLM(ModelConfig.from_preset("tiny-deepseek-moe", **SMALL_MODEL))
    root = tmp_path / "checkpoints"
    (root / "step-9.tmp").mkdir(parents=True)  # what a process killed while saving leaves behind
    for step in range(1, 5):
        with torch.no_grad():
            model.lm_head.weight.fill_(float(step))
        save_checkpoint(tmp_path, step, model, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["last", "step-3", "step-4"]
    assert (root / "last").read_text().strip() == "step-4"
    assert load_model(root / "step-3").lm_head.weight.eq(3.0).all()
    save_checkpoint(tmp_path, 5, model)  # keep_last=0 keeps everything
    assert sorted(p.name for p in root.iterdir()) == ["last", "step-3", "step-4", "step-5"]
