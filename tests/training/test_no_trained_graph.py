"""A micro-batch that puts no trained parameter in the graph (every group frozen but a few routed experts, and
none of them routed to) adds nothing to the step: no backward (it would raise "element 0 of tensors does not
require grad"), while its loss, tokens and routing still count in the step's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moetrain.cli import main
from moetrain.models.router import TopKRouter
from moetrain.training.module import MoETrainingModule

REPO = Path(__file__).resolve().parents[2]
FROZEN = ["embeddings", "attention", "norms", "routers", "shared_experts", "dense_mlp", "lm_head"]


@pytest.mark.parametrize("tier", ["none", "cpu"])
def test_micro_batches_that_reach_no_trained_expert_add_nothing(tmp_path, monkeypatch, tier):
    selection = tmp_path / "experts.json"
    selection.write_text(json.dumps({"experts": {"1": [0]}}))  # expert 0 of MoE layer 1 is all that trains
    blocked = {"on": False}
    select = TopKRouter.select

    def select_unless_blocked(self, scores):  # a blocked micro-batch routes no token to expert 0
        if blocked["on"]:
            scores = scores.clone()
            scores[:, 0] = -1.0
        return select(self, scores)

    step = MoETrainingModule.training_step

    def training_step(self, batch, batch_idx):
        blocked["on"] = batch_idx < 3  # step 1: both micro-batches blocked; step 2: the first one only
        return step(self, batch, batch_idx)

    monkeypatch.setattr(TopKRouter, "select", select_unless_blocked)
    monkeypatch.setattr(MoETrainingModule, "training_step", training_step)
    run_dir = tmp_path / "run"
    train = ",".join(f'"{g}": false' for g in FROZEN)
    assert main(["fit", "--config", str(REPO / "recipes" / "tiny.yaml"), f"--trainer.default_root_dir={run_dir}",
                 "--trainer.accelerator=cpu", "--trainer.max_steps=2", "--model.accumulate_grad_batches=2",
                 f"--model.train={{{train}, \"routed_experts\": \"{selection}\"}}",
                 f"--model.offload.placement.tier={tier}",
                 "--model.offload.schedule.step_on=gpu", f"--data.path={REPO / 'data' / 'tiny' / 'train.jsonl'}",
                 f"--data.tokenizer={REPO / 'data' / 'tiny' / 'tokenizer'}", "--data.micro_batch_size=2",
                 "--checkpoint.save_final=false"]) == 0
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert all(r["tokens"] == r["step"] * 2 * 2 * 128 for r in lines), "every micro-batch's tokens count"
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["loss"] > 0 for r in lines)
    assert lines[0]["grad_norm"] == 0.0, "step 1 put no trained parameter in any graph"
    assert lines[1]["grad_norm"] > 0.0, "step 2's second micro-batch trains expert 0"
