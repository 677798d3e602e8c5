"""Shared helpers of the checkpoint tests: a tiny recipe, ``moetrain`` run in-process, run-directory readers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

from moetrain.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "data" / "tiny"
SMALL_MODEL = dict(vocab_size=768, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, num_experts=4, moe_intermediate_size=16)
TOTAL_STEPS = 12


def small_data(tmp: Path, lines: int = 26) -> Path:
    """The first ``lines`` documents of the tiny validation set: about ten micro-batches per epoch, so that
    12 steps of 2 micro-batches cross epochs and a resume at step 6 lands inside one."""
    path = tmp / "train.jsonl"
    if not path.exists():
        path.write_text("\n".join((TINY / "val.jsonl").read_text().splitlines()[:lines]) + "\n")
    return path


def write_recipe(tmp: Path, data: Path, tier: str = "none", **checkpoint: Any) -> Path:
    """A copy of recipes/tiny.yaml shrunk to a 2-layer, 4-expert model; accumulation 2, a 12-step schedule."""
    recipe = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    recipe["trainer"].update(max_steps=TOTAL_STEPS, accelerator="cpu", enable_progress_bar=False)
    model = recipe["model"]
    model["config"] = dict(SMALL_MODEL)
    model["accumulate_grad_batches"] = 2
    model["optimizer"].update(lr=1e-2, warmup_steps=2, max_steps=TOTAL_STEPS)
    model["offload"] = {"placement": {"tier": tier, "gpu_slots": 2},
                        "nvme": {"path": str(tmp / "swap"), "backend": "threads"} if tier == "nvme" else {}}
    recipe["data"].update(path=str(data), tokenizer=str(TINY / "tokenizer"), val_path=None, seq_len=32,
                          micro_batch_size=2, shuffle=True, seed=5)
    recipe["checkpoint"].update(checkpoint)
    if tier == "nvme":
        (tmp / "swap").mkdir(exist_ok=True)
    path = tmp / f"recipe-{tier}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def fit(recipe: Path, run_dir: Path, *args: str) -> int:
    """``moetrain fit --config RECIPE --trainer.default_root_dir=RUN ARGS...`` in this process."""
    threads = torch.get_num_threads()
    try:
        return main(["fit", "--config", str(recipe), f"--trainer.default_root_dir={run_dir}", *args])
    finally:
        torch.set_num_threads(threads)  # the recipe's cpu_threads must not leak into other tests


def fit_subprocess(recipe: Path, run_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetrain.cli", "fit", "--config", str(recipe),
                           f"--trainer.default_root_dir={run_dir}", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def shard_tensors(ckpt: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's ``prefix`` shard set, read with safetensors directly (not moetrain)."""
    index = json.loads((ckpt / f"{prefix}.safetensors.index.json").read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(ckpt / fname), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def last(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    return root / (root / "last").read_text().strip()
