"""Convergence with compressed expert state: 200 steps of the tiny recipe (micro-batches of 4 rows, to keep
CI short) with each storage option end within 2% of the loss that fp32 state reaches. (``fp32_split`` keeps the
exact master, and the experts compute with its bf16 half, as bf16 compute weights on a GPU would.)

The six runs are independent processes, two at a time (the tiny recipe uses one thread each). The
fp32 reference runs with ``tier: none``: offloaded fp32 state equals it exactly (test_exactness.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 200
TAIL = 20  # the end loss is the mean of the last 20 steps (one step's loss is one batch's noise)
OPTIONS = {
    "fp32": ["--model.offload.placement.tier=none"],
    "bf16 moments": ["--model.offload.state.moments=bf16"],
    "int8 moments": ["--model.offload.state.moments=int8"],
    "bf16 master, stochastic rounding": ["--model.offload.state.master=bf16_sr"],
    "bf16 master, Kahan": ["--model.offload.state.master=bf16_kahan"],
    "fp32 master split, bf16 compute": ["--model.offload.state.master=fp32_split"],
}


def _command() -> list[str]:
    script = Path(sys.executable).parent / "moetrain"
    return [str(script)] if script.exists() else [sys.executable, "-m", "moetrain.cli"]


def _end_loss(run_dir: Path, overrides: list[str]) -> float:
    args = ["fit", "--config", "recipes/tiny.yaml", f"--trainer.max_steps={STEPS}",
            f"--trainer.default_root_dir={run_dir}", "--trainer.enable_progress_bar=false",
            "--checkpoint.save_final=false", "--model.offload.placement.tier=cpu", "--data.micro_batch_size=4",
            *overrides]
    done = subprocess.run([*_command(), *args], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == STEPS
    return sum(losses[-TAIL:]) / TAIL


@pytest.fixture(scope="module")
def end_losses(tmp_path_factory) -> dict[str, float]:
    root = tmp_path_factory.mktemp("convergence")
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(_end_loss, root / f"run{i}", args)
                   for i, (name, args) in enumerate(OPTIONS.items())}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("option", [name for name in OPTIONS if name != "fp32"])
def test_compressed_state_converges_like_fp32(end_losses, option):
    print({name: round(loss, 4) for name, loss in end_losses.items()})
    ref = end_losses["fp32"]
    assert ref < 2.0, "the fp32 run must have learned something for the comparison to mean anything"
    assert abs(end_losses[option] - ref) <= 0.02 * ref, f"{option}: {end_losses[option]:.4f} vs fp32 {ref:.4f}"
