"""The plan's ``largest preset`` line follows the recipe's selection: a recipe that trains a share of the routed
experts gets the largest preset one GPU fine-tunes training that share; every other recipe's line is the full
fine-tuning one, unchanged."""

from __future__ import annotations

import json
from pathlib import Path

from moetrain.cli import main
from moetrain.offload.plan.largest import Machine, largest_line

REPO = Path(__file__).resolve().parents[2]
GiB = 2**30


def test_a_share_of_the_experts_lets_a_larger_preset_fit():
    machine = Machine(79 * GiB, 64 * GiB, 128 * GiB)
    full = largest_line(machine, 2048)
    share = largest_line(machine, 2048, 0.2)
    # full fine-tuning: bf16_sr masters in the GPU's weights, the moments alone in the 64 GiB host
    assert full.startswith("largest preset one GPU fully fine-tunes (GPU 79 GiB")
    assert "deepseek-v2-lite (15.7 B)" in full
    assert "master bf16_sr, moments int8" in full
    assert share.startswith("largest preset one GPU fine-tunes training 20% of its routed experts, as this recipe does")
    assert "deepseek-moe-16b (16.4 B)" in share


def test_plan_prints_the_share_of_its_selection_only_when_the_file_is_there(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    selection = tmp_path / "experts.json"
    base = ["plan", "--config", "recipes/deepseek-moe-16b.yaml", "--gpu-gb=79", "--host-gb=64", "--disk-gb=128",
            f'--model.train={{"attention": false, "routed_experts": "{selection}"}}']

    def largest() -> str:
        assert main(base) == 0
        return next(x for x in capsys.readouterr().out.splitlines() if x.startswith("largest preset"))

    assert largest().startswith("largest preset one GPU fully fine-tunes"), "no selection file yet: full fine-tuning"
    selection.write_text(json.dumps({"experts": {str(layer): list(range(13)) for layer in range(1, 28)}}))
    assert "training 20% of its routed experts" in largest()  # 351 of 1728
