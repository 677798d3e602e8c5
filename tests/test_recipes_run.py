"""Every recipe is planned with ``moetrain plan`` (its header's memory plan must be what the planner prints for the
target machine the header names, line for line), every
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
REAL = ["deepseek-moe-16b", "qwen3-30b-a3b", "qwen2-moe-a2.7b", "mixtral-8x7b", "olmoe-1b-7b",
        "deepseek-moe-16b-esft", "qwen3-30b-a3b-esft"]
PLAN_COMMAND = re.compile(r"^#\s+moetrain plan (--config recipes/[\w.-]+\.yaml[^#]*?)\s*$")


def header_plan(recipe: Path) -> tuple[list[str], list[str]]:
    """(the plan command's arguments, the plan block) of a recipe's header. The block runs from its
    ``offload tier:`` line (or the ``note:`` line just above it, printed when ``init_from`` is not downloaded
    and the shape comes from ``model.preset``) to its ``largest preset`` line, each line commented with "# "
    (a blank one "#")."""
    header = [line for line in recipe.read_text().splitlines() if line.startswith("#")]
    commands = [m.group(1).split() for line in header if (m := PLAN_COMMAND.match(line))]
    text = [line[2:] if line.startswith("# ") else line[1:] for line in header]
    starts = [i for i, line in enumerate(text) if line.startswith("offload tier:")]
    starts = [i - 1 if i > 0 and text[i - 1].startswith("note: ") else i for i in starts]
    ends = [i for i, line in enumerate(text) if line.startswith("largest preset")]
    if not (commands and starts and ends):
        return [], []
    return commands[0], text[starts[0]:ends[0] + 1]


def test_every_preset_has_a_recipe():
    assert {p.stem for p in RECIPES} >= set(REAL) | {"tiny"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_plans_and_its_header_plan_is_current(recipe, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    parse_config(["fit", "--config", str(recipe)])  # checked against the code's signatures
    args, block = header_plan(recipe)
    init_from = (yaml.safe_load(recipe.read_text())["model"] or {}).get("init_from")
    if block and init_from and (REPO / init_from).exists():
        pytest.skip(f"{init_from} is downloaded here: the header plans the preset's shape, before the download")
    if recipe.stem in REAL or recipe.stem == "deepseek-v2-lite":
        assert block, f"{recipe}: the header must show the command and the memory plan that moetrain plan prints"
    # the header commands plan the recipe as written: a missing init_from directory plans its preset's shape
    assert "--model.init_from=null" not in args
    assert main(["plan", *(args or ["--config", str(recipe)])]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("offload tier:") for line in printed)
    if block:
        start = printed.index(block[0])
        now = printed[start:start + len(block)]
        stale = [(old, new) for old, new in zip(block, now, strict=True) if old != new]
        assert not stale, f"{recipe}: header plan lines differ from `moetrain plan` now (header, now): {stale}"


def test_recipes_that_target_one_gpu_fit_it_or_say_why_not():
    """A real-model recipe's plan fits its target machine on every tier (the disk too: the download, the swap and
    the checkpoints), or its header says DOES NOT FIT and why."""
    for name in [*REAL, "deepseek-v2-lite"]:
        recipe = REPO / "recipes" / f"{name}.yaml"
        _, block = header_plan(recipe)
        verdicts = [line for line in block if re.match(r"^\s+(gpu|host|disk|nvme)\s+total", line)]
        assert {line.split()[0] for line in verdicts} >= {"gpu", "host", "disk"}, recipe
        if any("DOES NOT FIT" in line for line in verdicts):
            assert "Status: DOES NOT FIT" in recipe.read_text(), f"{recipe}: say why it does not fit"


@pytest.mark.parametrize("name", [*REAL, "deepseek-v2-lite"])
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
    if (offload.get("nvme") or {}).get("path"):
        # the recipe spills past its host budget to NVMe: keep that, with a budget small enough to spill here
        args += [f"--model.offload.nvme.path={swap}", "--model.offload.placement.cpu_budget_gb=0.0005"]
    args += ["--model.offload.placement.gpu_budget_gb=0.001", "--model.offload.schedule.step_on=gpu"]
    if isinstance(recipe["model"].get("train"), dict):  # ESFT: two experts a layer of the reduced shape train
        selection = tmp_path / "experts.json"
        layers = ModelConfig.from_preset(recipe["model"]["preset"], **shape).moe_layers
        selection.write_text(json.dumps({"experts": {str(i): [0, 1] for i in layers}}))
        args.append(f"--model.train.routed_experts={selection}")
    assert main(args) == 0
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert all(r["loss"] > 0 and r["tokens"] == r["step"] * 2 * 2 * 64 for r in lines)
    assert any(k.startswith("offload/") for k in lines[-1]), "the offload engine's telemetry is logged"
    validation = [json.loads(line) for line in (run_dir / "validation.jsonl").read_text().splitlines()]
    assert validation[-1]["step"] == 2 and validation[-1]["val_ppl"] == pytest.approx(
        2.718281828 ** validation[-1]["val_ce_loss"], rel=1e-4)
    assert (run_dir / "checkpoints" / "last").is_file()
