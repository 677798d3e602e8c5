"""Every recipe is planned with ``moetrain plan`` (its header's memory plan must be what the planner prints), every
key of the real-model recipes is commented, and each real-model recipe trains 2 optimizer steps on the CPU on a
reduced-depth, reduced-width shape of its model (offload tiers, data, logger and checkpoint sections as written)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from moetrain.cli import main, parse_config
from moetrain.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
REAL = ["deepseek-moe-16b", "qwen3-30b-a3b", "qwen2-moe-a2.7b", "mixtral-8x7b", "olmoe-1b-7b"]
PLAN_ROW = re.compile(r"^#(  (gpu|host|nvme)  .*GiB)$")


def test_every_preset_has_a_recipe():
    assert {p.stem for p in RECIPES} >= set(REAL) | {"tiny"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_plans_and_its_header_plan_is_current(recipe, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    parse_config(["fit", "--config", str(recipe)])  # checked against the code's signatures
    assert main(["plan", "--config", str(recipe), "--model.init_from=null"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("offload tier:") for line in printed)
    header = [m.group(1) for line in recipe.read_text().splitlines() if (m := PLAN_ROW.match(line))]
    if recipe.stem in REAL:
        assert header, f"{recipe}: the header must show the memory plan that moetrain plan prints"
    stale = [row for row in header if row not in printed]
    assert not stale, f"{recipe}: header plan rows differ from `moetrain plan` now: {stale}"


@pytest.mark.parametrize("name", REAL)
def test_every_key_is_commented(name):
    for number, line in enumerate((REPO / "recipes" / f"{name}.yaml").read_text().splitlines(), start=1):
        if re.match(r"^\s*[A-Za-z_]+:\s*[^\s#]", line):  # a key with a value (section headers are plain)
            assert "#" in line, f"recipes/{name}.yaml, line {number}: key without a comment: {line.strip()}"


def reduced_shape(preset: str) -> dict:
    """The preset at 2 layers and hidden 64 (experts, top-k, routing and attention kinds kept)."""
    full = ModelConfig.from_preset(preset)
    shape = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=768, max_position_embeddings=256)
    if full.head_dim is not None:
        shape["head_dim"] = 16
    if full.shared_expert_intermediate_size:
        shape["shared_expert_intermediate_size"] = 48
    if full.sliding_window:
        shape["sliding_window"] = 16  # shorter than the rows, so the window is exercised
    return shape


@pytest.mark.parametrize("name", REAL)
def test_real_recipe_trains_two_steps_on_a_reduced_shape(name, tmp_path):
    recipe = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
    shape = reduced_shape(recipe["model"]["preset"])
    swap = tmp_path / "swap"
    swap.mkdir()
    offload = recipe["model"]["offload"]
    run_dir = tmp_path / "run"
    args = ["fit", "--config", str(REPO / "recipes" / f"{name}.yaml"),
            f"--trainer.default_root_dir={run_dir}", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
            "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
            "--model.init_from=null", f"--model.config={json.dumps(shape)}",
            "--model.accumulate_grad_batches=2", "--cpu_threads=1",
            f"--data.path={REPO / 'data' / 'examples' / 'chat.jsonl'}",
            f"--data.tokenizer={REPO / 'data' / 'examples' / 'tokenizer'}",
            "--data.seq_len=64", "--data.micro_batch_size=2", "--data.num_workers=0",
            "--metrics.logger=csv", "--metrics.heatmap_every_n_steps=2", "--checkpoint.max_shard_mb=1"]
    if offload.get("nvme_path"):
        # the recipe spills past its host budget to NVMe: keep that, with a budget small enough to spill here
        args += [f"--model.offload.nvme_path={swap}", "--model.offload.cpu_budget_gb=0.0005"]
    args += ["--model.offload.gpu_budget_gb=0.001", "--model.offload.step_on=gpu"]
    assert main(args) == 0
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert all(r["loss"] > 0 and r["tokens"] == r["step"] * 2 * 2 * 64 for r in lines)
    assert any(k.startswith("offload/") for k in lines[-1]), "the offload engine's telemetry is logged"
    validation = [json.loads(line) for line in (run_dir / "validation.jsonl").read_text().splitlines()]
    assert validation[-1]["step"] == 2 and validation[-1]["val_ppl"] == pytest.approx(
        2.718281828 ** validation[-1]["val_ce_loss"], rel=1e-4)
    assert (run_dir / "checkpoints" / "last").is_file()
