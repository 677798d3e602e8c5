"""The front-door benchmark on the CPU with the tiny ESFT recipe: a random directory of its shape, then
``moetrain select-experts`` (the recipe's selection file), plan and fit; ``--compare-full`` runs the same recipe
with ``--model.train=all`` next and prints both RESULT lines and their comparison."""

from __future__ import annotations

import json
from pathlib import Path

from moetrain.bench.recipe_run import apply_overrides, compare, plan_figures, selection_file

REPO = Path(__file__).resolve().parents[2]


def test_plan_figures_read_the_selection_and_the_bytes_paged():
    text = ("routed experts training: 351 of 1728 (20%, model.train.routed_experts runs/x/experts.json)\n"
            "  gpu   total   38.50 GiB of   139.00 GiB: fits\n"
            "  link: 15.712 GiB per step at 93 GB/s -> 0.181 s;  compute: 17.562 s\n"
            "  floor of a step: 17.562 s (compute-bound)\n")
    assert plan_figures(text) == {"plan_gpu_gib": 38.5, "plan_step_s": 17.562, "plan_compute_s": 17.562,
                                  "plan_paged_gib_per_step": 15.712, "plan_trained_experts": 351,
                                  "plan_total_experts": 1728}


def test_selection_file_and_overrides():
    recipe = {"model": {"train": {"attention": False, "routed_experts": "runs/a/experts.json"}}}
    assert selection_file(recipe) == "runs/a/experts.json"
    assert selection_file(apply_overrides(recipe, ["--model.train=all"])) is None
    assert apply_overrides({}, ["--data.seq_len=64"]) == {"data": {"seq_len": 64}}
    both = compare({"recipe": "r", "step_s": 1.0, "host_peak_gib": 2.0}, {"step_s": 4.0, "host_peak_gib": None})
    assert both["step_s"] == {"esft": 1.0, "full": 4.0, "ratio": 0.25} and both["host_peak_gib"]["ratio"] is None


def test_esft_recipe_against_full_fine_tuning_on_the_cpu(tmp_path, capsys):
    from moetrain.bench.recipe_run import main

    out = main(["--recipe", "recipes/tiny-esft.yaml", "--compare-full", "--steps", "2", "--select-tokens", "4096",
                "--model-dir", str(tmp_path / "model"), "--workdir", str(tmp_path / "work"),
                "--out", str(tmp_path / "out"), "--timeout", "240",
                "--data.format=auto"])  # the bench's corpus is text; the recipe's task data is instruction pairs
    esft, full = out["esft"], out["full"]
    assert esft["select_rc"] == 0 and esft["rc"] == 0 and full["rc"] == 0, (esft["log_tail"], full["log_tail"])
    assert 0 < esft["selected_experts"] < esft["total_experts"] == 48
    assert esft["plan_trained_experts"] == esft["selected_experts"] and esft["plan_total_experts"] == 48
    assert "plan_trained_experts" not in full and "select_s" not in full
    assert esft["steps_logged"] == full["steps_logged"] == 2 and esft["step_s"] > 0 and full["step_s"] > 0
    assert (tmp_path / "work" / "runs" / "tiny-esft" / "experts.json").is_file()
    assert (tmp_path / "work" / "runs" / "tiny-esft-full" / "metrics.jsonl").is_file()
    printed = [json.loads(line[7:]) for line in capsys.readouterr().out.splitlines() if line.startswith("RESULT ")]
    assert [r.get("variant", r["bench"]) for r in printed] == ["tiny-esft", "tiny-esft-full", "recipe_run_compare"]
    assert printed[-1]["step_s"]["esft"] == esft["step_s"]
    assert printed[-1]["selected_experts"] == esft["selected_experts"]


def test_random_init_writes_no_model_directory(tmp_path):
    """``--random-init``: the recipe's init_from is replaced by a random initialisation (one override, recorded), no
    model directory is written, and the tokenizer link points at the shipped tokenizer."""
    from moetrain.bench.recipe_run import main
    from moetrain.models.random_hf import DEFAULT_TOKENIZER

    work = tmp_path / "work"
    out = main(["--recipe", "recipes/tiny-task.yaml", "--random-init", "--steps", "2", "--workdir", str(work),
                "--out", str(tmp_path / "out"), "--timeout", "240", "--data.format=auto"])
    assert out["rc"] == 0 and out["steps_logged"] == 2, out.get("log_tail")
    assert out["overrides"][-1] == "--model.init_from=null" and "make_model_dir_s" not in out
    assert not (work / "runs" / "tiny-base").exists()  # the recipe's init_from: never linked
    assert (work / "data" / "tiny" / "tokenizer").resolve() == DEFAULT_TOKENIZER.resolve()
