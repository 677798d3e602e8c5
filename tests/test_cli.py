"""``moetrain fit`` end to end: the tiny recipe as the README runs it, its run directory, and bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from moetrain.cli import main
from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.keymap import to_hf_name
from moetrain.training.checkpoint import load_model
from moetrain.training.data import TextDataModule

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"step", "loss", "ce_loss", "aux_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s",
               "startup_s"}


def moetrain_command() -> list[str]:
    """The installed console script when present (what users run), else the same entry point via -m."""
    script = Path(sys.executable).parent / "moetrain"
    return [str(script)] if script.exists() else [sys.executable, "-m", "moetrain.cli"]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*moetrain_command(), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The full tiny recipe, as in the README, with a checkpoint every 30 steps; returns (run dir, seconds, result)."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    start = time.perf_counter()
    result = run_cli("fit", "--config", "recipes/tiny.yaml", f"--trainer.default_root_dir={run_dir}",
                     "--checkpoint.every_n_steps=30")
    return run_dir, time.perf_counter() - start, result


@pytest.mark.slow
def test_tiny_recipe_trains_in_two_minutes_with_falling_loss(tiny_run):
    run_dir, seconds, result = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert seconds < 120, f"moetrain fit --config recipes/tiny.yaml took {seconds:.0f} s"
    records = read_metrics(run_dir)
    max_steps = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())["trainer"]["max_steps"]
    assert [r["step"] for r in records] == list(range(1, max_steps + 1))
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.7 * first, f"loss fell only from {first:.3f} to {last:.3f}"


@pytest.mark.slow
def test_metrics_lines_hold_the_contract_fields(tiny_run):
    run_dir, _, result = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run_dir)
    for r in records:
        assert METRIC_KEYS <= r.keys()
        assert all(math.isfinite(r[k]) for k in METRIC_KEYS)
        assert abs(r["loss"] - r["ce_loss"] - r["aux_loss"]) < 1e-4 and r["aux_loss"] > 0
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    assert [r["tokens"] for r in records] == [r["step"] * 8 * 128 for r in records]  # micro-batch 8 x seq 128
    # where each step's time went (moetrain.training.step_timing): from the end of step 1 to the end of the last one
    # the parts follow each other, so they add up to the time between those two lines (up to the callbacks' time
    # between a step's end and its line, which a checkpoint save can lengthen)
    parts = ("time/between_steps_s", "time/forward_backward_s", "time/optimizer_s")
    assert all(r[k] > 0 for r in records[1:] for k in parts)
    assert "time/between_steps_s" not in records[0] and records[0]["time/forward_backward_s"] > 0
    total = sum(r[k] for r in records[1:] for k in parts)
    assert total == pytest.approx(records[-1]["elapsed_s"] - records[0]["elapsed_s"], rel=0.1, abs=0.3)
    # each micro-batch is marked too: the median and slowest sit inside the forward and backward they divide
    for r in records:
        assert 0 < r["time/micro_batch_median_s"] <= r["time/micro_batch_max_s"] <= r["time/forward_backward_s"]
        assert r["time/micro_batch_max_index"] == 0 and r["host/gc_s"] >= 0  # recipes/tiny.yaml: one a step
    assert max(r["lr"] for r in records) == pytest.approx(0.003)


@pytest.mark.slow
def test_checkpoint_layout(tiny_run):
    run_dir, _, result = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["last", "step-30", "step-60"]
    assert (root / "last").read_text().strip() == "step-60"
    ckpt = root / "step-60"
    for name in ("model.safetensors.index.json", "config.json", "moetrain_config.json", "recipe.yaml",
                 "optimizer.json", "optimizer.safetensors.index.json", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    config = ModelConfig.load(ckpt / "moetrain_config.json")
    assert config == ModelConfig.from_preset("tiny-deepseek-moe", vocab_size=768, eos_token_id=config.eos_token_id)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    expected_names = {to_hf_name(config.family, n) for n in MoEForCausalLM(config).state_dict()}
    assert set(index["weight_map"]) == expected_names
    assert all((ckpt / shard).is_file() for shard in set(index["weight_map"].values()))
    hf_config = json.loads((ckpt / "config.json").read_text())
    assert hf_config["vocab_size"] == 768 and hf_config["num_hidden_layers"] == config.num_hidden_layers
    recipe = yaml.safe_load((ckpt / "recipe.yaml").read_text())
    assert recipe["trainer"]["max_steps"] == 60 and recipe["checkpoint"]["every_n_steps"] == 30
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 60


@pytest.mark.slow
def test_checkpoint_model_reproduces_the_logged_loss(tiny_run):
    """The saved weights are the trained ones: evaluating step-60 reproduces training's loss level, step-30 is worse."""
    run_dir, _, result = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    data = TextDataModule(str(REPO / "data/tiny/train.jsonl"), str(REPO / "data/tiny/tokenizer"), seq_len=128,
                          micro_batch_size=8, shuffle=False)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))

    def loss_of(step: int) -> float:
        model = load_model(run_dir / "checkpoints" / f"step-{step}").eval()
        with torch.no_grad():
            return model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                         document_ids=batch["document_ids"]).loss.item()

    records = read_metrics(run_dir)
    final = loss_of(60)
    assert final < loss_of(30)
    assert final < 1.5 * records[-1]["loss"]  # a random model would sit near ln(768) = 6.6
    assert load_model(run_dir / "checkpoints" / "step-60").num_parameters() == MoEForCausalLM(
        ModelConfig.load(run_dir / "checkpoints" / "step-60" / "moetrain_config.json")).num_parameters()


@pytest.mark.slow
def test_resume_from_last(tiny_run):
    run_dir, _, result = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = run_cli("fit", "--config", "recipes/tiny.yaml", f"--trainer.default_root_dir={run_dir}",
                      "--trainer.max_steps=62", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)][-3:] == [60, 61, 62]
    assert (run_dir / "checkpoints" / "last").read_text().strip() == "step-62"


# ---------------------------------------------------------------------------------------------- bad input
def assert_one_paragraph(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    text = err.strip()
    assert text.startswith("moetrain: error:") and "\n\n" not in text
    flat = " ".join(text.split())
    for needle in needles:
        assert needle in flat, f"{needle!r} not in: {flat}"


def test_unknown_key_in_recipe(run_main, tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text((REPO / "recipes" / "tiny.yaml").read_text().replace("  seq_len: 128", "  seq_length: 128"))
    code, err = run_main("fit", "--config", str(recipe))
    assert code == 2
    assert_one_paragraph(err, "data.seq_length", str(recipe))


def test_unknown_key_on_command_line(run_main):
    code, err = run_main("fit", "--config", "recipes/tiny.yaml", "--model.optimizer.learning_rate=1")
    assert code == 2
    assert_one_paragraph(err, "--model.optimizer.learning_rate")


def test_malformed_yaml_names_line(run_main, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("trainer:\n  max_steps: 3\n model:\n  preset: x\n")
    code, err = run_main("fit", "--config", str(recipe))
    assert code == 2
    assert_one_paragraph(err, f"{recipe}, line 3", "not valid YAML")


def test_missing_files(run_main):
    code, err = run_main("fit", "--config", "recipes/nope.yaml")
    assert code == 2
    assert_one_paragraph(err, "recipes/nope.yaml not found")
    code, err = run_main("fit", "--config", "recipes/tiny.yaml", "--data.path=data/tiny/missing.jsonl")
    assert code == 2
    assert_one_paragraph(err, "data.path", "data/tiny/missing.jsonl not found")


def test_broken_data_line_names_file_and_line(run_main, tmp_path):
    data = tmp_path / "broken.jsonl"
    lines = (REPO / "data" / "tiny" / "val.jsonl").read_text().splitlines()[:20]
    lines[11] = lines[11][:-3]  # cut the closing quote and brace of line 12
    data.write_text("\n".join(lines) + "\n")
    code, err = run_main("fit", "--config", "recipes/tiny.yaml", f"--data.path={data}",
                         f"--trainer.default_root_dir={tmp_path / 'run'}")
    assert code == 2
    assert_one_paragraph(err, f"{data}, line 12", "not valid JSON")


def test_invalid_section_value(run_main):
    code, err = run_main("fit", "--config", "recipes/tiny.yaml", "--model.offload.placement.tier=gpu")
    assert code == 2
    assert_one_paragraph(err, "model.offload.placement.tier='gpu'", "none, cpu, nvme")


TRAINER_REFUSALS = [
    # (override, what the paragraph must say): values of the right type that Lightning's Trainer refuses
    ("--trainer.max_steps=-5", ("trainer.max_steps=-5", "non-negative integer or -1", "Set trainer.max_steps")),
    ("--trainer.limit_train_batches=-1", ("trainer.limit_train_batches=-1", "[0.0, 1.0] or an int")),
    ("--trainer.devices=0", ("trainer.devices='0'", "not a valid input", "Set trainer.devices")),
    ("--trainer.accelerator=tpuxx", ("trainer.accelerator='tpuxx'", "Available names", "cpu")),
    ("--trainer.precision=banana", ("trainer.precision", "banana")),  # refused by the parser's type check
    ("--trainer.max_steps=abc", ("trainer.max_steps", "abc")),
]
if importlib.util.find_spec("transformer_engine") is None:
    TRAINER_REFUSALS.append(("--trainer.precision=transformer-engine",
                             ("trainer.precision='transformer-engine'", "not installed", "transformer_engine")))


@pytest.mark.parametrize("override,needles", TRAINER_REFUSALS, ids=[o.split("=")[0][10:] + "=" + o.split("=")[1]
                                                                    for o, _ in TRAINER_REFUSALS])
def test_values_lightning_refuses_name_the_trainer_key(run_main, tmp_path, override, needles):
    code, err = run_main("fit", "--config", "recipes/tiny.yaml", "--trainer.accelerator=cpu", override,
                         f"--trainer.default_root_dir={tmp_path}")
    assert code == 2
    assert_one_paragraph(err, *needles)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_refused_trainer_value_in_the_recipe_file(run_main, tmp_path):
    recipe = tmp_path / "negative.yaml"
    text = (REPO / "recipes" / "tiny.yaml").read_text()
    recipe.write_text(re.sub(r"(?m)^(  max_epochs:).*$", r"\1 -3", text) if "max_epochs:" in text
                      else text.replace("trainer:\n", "trainer:\n  max_epochs: -3\n", 1))
    code, err = run_main("fit", "--config", str(recipe), f"--trainer.default_root_dir={tmp_path / 'run'}")
    assert code == 2
    assert_one_paragraph(err, "trainer.max_epochs=-3", "non-negative integer or -1", "Set trainer.max_epochs")


def test_console_script_exit_status_and_no_traceback():
    result = run_cli("fit", "--config", "recipes/tiny.yaml", "--trainer.max_stepz=3", timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "trainer.max_stepz" in " ".join(result.stderr.split())


@pytest.mark.slow
def test_validate_the_last_checkpoint(tiny_run, capsys, monkeypatch):
    run_dir, _, result = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    monkeypatch.chdir(REPO)
    threads = torch.get_num_threads()
    try:
        code = main(["validate", "--config", "recipes/tiny.yaml", f"--trainer.default_root_dir={run_dir}",
                     "--ckpt_path=last"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0
    val_loss = float(next(line for line in out.splitlines() if "val_loss" in line).split("│")[2])
    assert val_loss < 0.5 * math.log(768)  # held-out documents: far below a random model's ln(vocab)


# ---------------------------------------------------------------------------------------------- --help
SUBCOMMANDS = ("fit", "validate", "plan", "export", "bench", "generate", "select-experts", "prune", "build-ops")


def help_entries(text: str) -> dict[str, str]:
    """``--key`` -> its description (without jsonargparse's "(type: ..., default: ...)") in an argparse help."""
    entries: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        match = re.match(r"  (--[\w.]+)(?: \S+)?(?:, --[\w.+]+(?: \S+)?)?(?:  +(.*))?$", line)
        if match:
            key = match.group(1)
            entries[key] = match.group(2) or ""
        elif key and line.startswith("      "):
            entries[key] += " " + line.strip()
        else:
            key = None
    return {k: re.sub(r"\s*\((?:required, )?type: .*$", "", " ".join(v.split())) for k, v in entries.items()}


def test_top_level_help_lists_only_subcommands_that_answer_help(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["--help"]) == 0
    listed = re.findall(r"(?m)^  ([\w-]+) ", capsys.readouterr().out)
    assert tuple(listed) == SUBCOMMANDS
    for name in listed:
        assert main([name, "--help"]) == 0, name
        captured = capsys.readouterr()
        assert captured.out.startswith(f"usage: moetrain {name}"), (name, captured.out[:200], captured.err[-500:])
        assert "not yet available" not in captured.err


def test_bench_lists_the_benchmarks_and_runs_one_on_the_cpu(capsys, tmp_path):
    assert main(["bench", "--help"]) == 0
    listing = capsys.readouterr().out
    for name in ("link", "expert_compute", "offload_step", "multi_gpu", "checkpoint_io"):
        assert re.search(rf"(?m)^  {name} ", listing), name
    assert not re.search(r"(?m)^  stream_overlap ", listing)  # a helper of offload_step, not a benchmark
    assert main(["bench", "link", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: moetrain bench link")
    if not torch.cuda.is_available():
        assert main(["bench", "link"]) == 2
        assert "link measures a CUDA GPU and none is visible here" in capsys.readouterr().err
    out = tmp_path / "out"
    code = main(["bench", "checkpoint_io", "--out", str(out), "--preset", "tiny-deepseek-moe", "--layers", "2",
                 "--disk-gb", "0.01", "--init-sizes-gb", "0.002", "--shard-mb", "1"])
    assert code == 0
    result = json.loads((out / "checkpoint_io.json").read_text())
    assert result["save_load"]["ckpt_bytes"] > 0 and result["init_from"][0]["loaded_model_bytes"] > 0
    assert main(["bench", "nope"]) == 2 and "unknown benchmark 'nope'" in capsys.readouterr().err


def test_fit_help_leads_with_moetrain_sections_and_describes_every_key(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["fit", "--help"]) == 0
    text = capsys.readouterr().out
    headers = re.findall(r"(?m)^([a-z][\w.]*): .*:$", text)  # group titles
    sections = ["model", "model.optimizer", "model.offload", "data", "checkpoint", "metrics", "progress", "profile",
                "parallel"]
    assert headers[:len(sections)] == sections and headers[-1] == "trainer"
    entries = help_entries(text)
    keys = [k for k in entries if k.split(".")[0].removeprefix("--") in sections and k.removeprefix("--")
            not in sections]  # the keys of moetrain's sections, not the sections' own --SECTION CONFIG
    assert len([k for k in keys if k.startswith("--model.offload.")]) >= 19
    assert not [k for k in keys if not entries[k]], "keys without a description"
    assert "in pinned host memory" in entries["--model.offload.placement.tier"]
    trainer = [k for k in entries if k.startswith("--trainer.")]
    assert "--trainer.max_steps" in trainer and "--trainer.gradient_clip_val" not in trainer and len(trainer) <= 20
    assert "--help=all" in text and len(text.splitlines()) < 450

    assert main(["fit", "--help=all"]) == 0
    full = help_entries(capsys.readouterr().out)
    assert {"--trainer.gradient_clip_val", "--trainer.max_epochs", "--trainer.profiler"} <= set(full)
    assert full["--trainer.gradient_clip_val"].startswith("not used: set model.optimizer.max_grad_norm")
