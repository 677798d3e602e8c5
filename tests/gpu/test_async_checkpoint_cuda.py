"""``checkpoint.async`` on CUDA: the writer thread reads the pinned host slab (or the swap file through its own
channel) while the GPU trains, pages experts in during backward and steps them.

Runs on the GPU are not bitwise repeatable, so each asynchronous checkpoint is compared with a synchronous
one written in the same process at the same step boundary, just before the snapshot: any byte the training
thread changed under the writer would show.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "training"))
from ckpt_harness import fit, shard_tensors, small_data, write_recipe  # noqa: E402

import moetrain.shards as shards  # noqa: E402
from moetrain.training.async_checkpoint import AsyncSaver  # noqa: E402
from moetrain.training.checkpoint import save_checkpoint  # noqa: E402


@pytest.mark.parametrize("tier,step_on,max_grad_norm", [("cpu", "gpu", 1.0), ("cpu", "gpu", 0.0),
                                                        ("nvme", "gpu", 1.0), ("cpu", "cpu", 1.0)])
def test_async_checkpoints_equal_synchronous_ones_taken_at_the_same_boundary(tmp_path, monkeypatch, tier, step_on,
                                                                             max_grad_norm):
    recipe = write_recipe(tmp_path, small_data(tmp_path), tier, every_n_steps=2)
    text = yaml.safe_load(recipe.read_text())
    text["trainer"].update(accelerator="gpu", devices=1)
    text["model"]["offload"]["schedule"] = {"step_on": step_on}
    text["model"]["optimizer"]["max_grad_norm"] = max_grad_norm
    recipe.write_text(yaml.safe_dump(text))
    reference = tmp_path / "reference"
    save = AsyncSaver.save

    def save_twice(self, run_dir, step, model, optimizer=None, **kwargs):
        save_checkpoint(reference, step, model, optimizer=optimizer, **kwargs)  # synchronous, same boundary
        save(self, run_dir, step, model, optimizer=optimizer, **kwargs)

    save_shard = shards._save_shard

    def slow(tensors, path, metadata):  # the writer is still reading when the next step comes
        if threading.current_thread().name == "moetrain-checkpoint-writer":
            time.sleep(0.3)
        save_shard(tensors, path, metadata)

    monkeypatch.setattr(AsyncSaver, "save", save_twice)
    monkeypatch.setattr(shards, "_save_shard", slow)
    run = tmp_path / "run"
    assert fit(recipe, run, "--trainer.max_steps=6", "--checkpoint.async=true") == 0
    for step in (2, 4, 6):
        for prefix in ("model", "optimizer"):
            a = shard_tensors(reference / "checkpoints" / f"step-{step}", prefix)
            b = shard_tensors(run / "checkpoints" / f"step-{step}", prefix)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (step, prefix)
