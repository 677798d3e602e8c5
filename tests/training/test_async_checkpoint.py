"""``checkpoint.async: true``: checkpoints written by a background thread while training goes on.

The writer is slowed down (each shard sleeps) so that training reaches the next optimizer step while the
expert store is still being read: a checkpoint that mixed two steps would differ from the synchronous
one of the same step. Asynchronous runs must give the same checkpoints, losses and resumed weights as
synchronous ones, and a writer's error must end the run with the synchronous save's one-paragraph error.
"""

from __future__ import annotations

import errno
import json
import threading
import time

import pytest
import yaml
from ckpt_harness import fit, last, metrics, shard_tensors, small_data, write_recipe

import moetrain.shards as shards
from moetrain.training.async_checkpoint import AsyncSaver

HALF = 6
WRITER = "moetrain-checkpoint-writer"


def slow_writer(monkeypatch, seconds: float = 0.3) -> None:
    """Each shard the writer thread saves takes ``seconds`` longer (the training thread's saves do not)."""
    save_shard = shards._save_shard

    def slow(tensors, path, metadata):
        if threading.current_thread().name == WRITER:
            time.sleep(seconds)
        save_shard(tensors, path, metadata)

    monkeypatch.setattr(shards, "_save_shard", slow)


def waits_counted(monkeypatch) -> list[float]:
    """Record how long the training thread waited for the writer to free the store."""
    waited: list[float] = []
    wait_for_store = AsyncSaver.wait_for_store

    def timed(self):
        t0 = time.perf_counter()
        wait_for_store(self)
        waited.append(time.perf_counter() - t0)

    monkeypatch.setattr(AsyncSaver, "wait_for_store", timed)
    return waited


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("async")
    return tmp, small_data(tmp)


VARIANTS = {
    # name: (tier, changes to the recipe's model section)
    "none": ("none", {}),
    "cpu": ("cpu", {}),
    "nvme": ("nvme", {}),
    # no clipping: the last micro-batch's backward steps the experts, so the training thread waits there
    "cpu-step-in-backward": ("cpu", {"optimizer": {"max_grad_norm": 0.0}}),
    # idle experts catch up in the forward, which then writes the store: the wait comes before the batch
    "cpu-idle-dense": ("cpu", {"offload": {"schedule": {"idle_experts": "dense"}}}),
    # the masters only in the weights (host_drops_masters): the writer thread reads them there, and a backward that
    # steps layers writes them there, so it waits for the writer too
    "cpu-masters-in-weights": ("cpu", {"offload": {"state": {"master": "bf16_sr", "moments": "int8"}},
                                       "optimizer": {"max_grad_norm": 0.0}}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_async_saves_equal_synchronous_and_resume_exactly(data, variant, monkeypatch):
    """Every 2 steps, async, to step 6; resumed (async) to 12. Checkpoints 2, 4, 6 equal the synchronous
    run's, and step 12 and the losses of steps 7-12 equal a straight synchronous run."""
    tmp, path = data
    tier, changes = VARIANTS[variant]
    recipe = write_recipe(tmp, path, tier, every_n_steps=2)
    text = yaml.safe_load(recipe.read_text())
    for section, values in changes.items():
        text["model"][section].update(values)
    recipe = tmp / f"recipe-{variant}.yaml"
    recipe.write_text(yaml.safe_dump(text))
    sync, run = tmp / f"sync-{variant}", tmp / f"async-{variant}"
    assert fit(recipe, sync) == 0

    slow_writer(monkeypatch)
    waited = waits_counted(monkeypatch)
    assert fit(recipe, run, f"--trainer.max_steps={HALF}", "--checkpoint.async=true") == 0
    assert fit(recipe, run, "--ckpt_path=last", "--checkpoint.async=true") == 0
    if tier != "none":  # the slowed writer still held the store when the next step came
        assert max(waited) > 0.1, waited

    for step in (2, 4, HALF, 12):
        a, b = sync / "checkpoints" / f"step-{step}", run / "checkpoints" / f"step-{step}"
        assert same(shard_tensors(a, "model"), shard_tensors(b, "model")), step
        assert same(shard_tensors(a, "optimizer"), shard_tensors(b, "optimizer")), step
        assert json.loads((a / "optimizer.json").read_text()) == json.loads((b / "optimizer.json").read_text())
        state_a, state_b = (json.loads((d / "trainer_state.json").read_text()) for d in (a, b))
        assert state_a["data"] == state_b["data"], step
        if step <= HALF:  # captured at the same boundary of an uninterrupted process history
            assert state_a["rng"] == state_b["rng"] and state_a["routing"] == state_b["routing"], step
    assert last(run).name == "step-12" and not list((run / "checkpoints").glob("*.tmp"))
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(sync)]
    assert [r["step"] for r in metrics(run)] == list(range(1, 13))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_failed_write_is_the_same_clean_error(data, mode, monkeypatch, capsys):
    """A full disk while writing step 4: exit 2, one paragraph naming the directory and what to do, no
    traceback, ``last`` still on step 2 and no half-written directory; the same text in both modes."""
    tmp, path = data
    recipe = write_recipe(tmp, path, "cpu", every_n_steps=2)
    run = tmp / "full-disk"  # the same directory for both modes, so that the messages compare
    if run.exists():
        import shutil

        shutil.rmtree(run)
    save_shard = shards._save_shard

    def full(tensors, path, metadata):
        if path.parent.name == "step-4.tmp":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        save_shard(tensors, path, metadata)

    monkeypatch.setattr(shards, "_save_shard", full)
    capsys.readouterr()
    code = fit(recipe, run, "--trainer.max_steps=6", f"--checkpoint.async={str(mode == 'async').lower()}")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    paragraph = " ".join(err[err.index("moetrain: error:"):].split())
    assert "step-4.tmp" in paragraph and "No space left on device" in paragraph and "step-2" in paragraph
    assert "--ckpt_path=last" in paragraph
    assert last(run).name == "step-2" and not (run / "checkpoints" / "step-4.tmp").exists()
    # the run stopped at the failed save (a synchronous save fails inside step 4, an async one by step 6)
    assert [r["step"] for r in metrics(run)][-1] <= 6
    test_a_failed_write_is_the_same_clean_error.messages[mode] = paragraph
    if len(test_a_failed_write_is_the_same_clean_error.messages) == 2:
        assert len(set(test_a_failed_write_is_the_same_clean_error.messages.values())) == 1


test_a_failed_write_is_the_same_clean_error.messages = {}
