"""The user-facing contract of the offload tiers: `moetrain fit` on the tiny recipe with expert state in
pinned host memory or on NVMe ends with the same checkpoint as with everything resident (fp32, CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moetrain.cli import main

REPO = Path(__file__).resolve().parents[2]
STEPS = 6


def _fit(run_dir: Path, *overrides: str) -> dict[str, torch.Tensor]:
    threads, cwd = torch.get_num_threads(), os.getcwd()
    os.chdir(REPO)  # the recipe names its data relative to the repository root
    try:
        code = main(["fit", "--config", str(REPO / "recipes" / "tiny.yaml"), f"--trainer.max_steps={STEPS}",
                     f"--trainer.default_root_dir={run_dir}", "--trainer.enable_progress_bar=false",
                     "--model.accumulate_grad_batches=2", "--data.micro_batch_size=2", *overrides])
    finally:
        torch.set_num_threads(threads)
        os.chdir(cwd)
    assert code == 0
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "last").read_text().strip()
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(ckpt.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.fixture(scope="module")
def resident(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("none"), "--model.offload.placement.tier=none")


@pytest.mark.parametrize("tier", ["cpu", "nvme", "cpu-paged"])
def test_offloaded_fit_ends_with_the_resident_checkpoint(resident, tier, tmp_path):
    """``cpu-paged``: tier cpu with the compute weights paged from host memory too (resident_weights=no)."""
    args = [f"--model.offload.placement.tier={tier.removesuffix('-paged')}"]
    if tier.endswith("-paged"):
        args.append("--model.offload.placement.resident_weights=no")
    if tier == "nvme":
        (tmp_path / "swap").mkdir()
        args.append(f"--model.offload.nvme.path={tmp_path / 'swap'}")
    offloaded = _fit(tmp_path / "run", *args)
    assert offloaded.keys() == resident.keys()
    experts = [n for n in resident if ".mlp.experts." in n]
    assert experts, "the checkpoint holds the routed experts"
    worst = max((offloaded[n] - resident[n]).abs().max().item() for n in resident)
    assert worst <= 1e-6, f"tier {tier}: max abs difference {worst:.2e} from tier none"
