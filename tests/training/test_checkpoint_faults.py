"""Faults: SIGKILL in the middle of a save, SIGTERM/Ctrl-C during training, and damaged checkpoints.

A killed save leaves the previous checkpoint intact and ``last`` naming it; a resume from there equals an
uninterrupted run. A signal during training finishes the step, saves, exits with 128 + signal; resuming
equals an uninterrupted run. A damaged checkpoint gives one paragraph naming the file or tensor, exit
status 2, no traceback, and nothing in the run directory changes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from ckpt_harness import REPO, fit, last, metrics, shard_tensors, small_data, write_recipe

import moetrain.shards as shards
from moetrain.training.module import MoETrainingModule

# A child that runs ``moetrain fit`` and stalls after the first shard of the step-4 checkpoint, announcing it.
CHILD = textwrap.dedent("""
    import sys, threading, time, pathlib
    marker, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
    import moetrain.shards as shards
    save_shard = shards._save_shard
    def stalling_save(tensors, path, metadata):
        save_shard(tensors, path, metadata)
        if mode == "kill_in_save" and path.parent.name == "step-4.tmp":
            marker.write_text(threading.current_thread().name)
            time.sleep(300)
    shards._save_shard = stalling_save
    from moetrain.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def start_child(tmp: Path, mode: str, recipe: Path, run_dir: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    marker = tmp / f"marker-{mode}"
    marker.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", CHILD, str(marker), mode, "fit", "--config", str(recipe),
           f"--trainer.default_root_dir={run_dir}", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"child ended before the hook fired:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    return proc, marker


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    data = small_data(tmp)
    recipe = write_recipe(tmp, data, "cpu", every_n_steps=2)
    straight = tmp / "straight"
    assert fit(recipe, straight, "--trainer.max_steps=4") == 0
    return tmp, recipe, straight


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_during_save_keeps_previous_checkpoint(setup, mode):
    """Killed while step 4's shards are written: by the training thread itself, or (``checkpoint.async``) by the
    writer thread while the training thread has moved on (waiting for it at the end of training)."""
    tmp, recipe, straight = setup
    run = tmp / f"killed-{mode}"
    flag = f"--checkpoint.async={str(mode == 'async').lower()}"
    proc, marker = start_child(tmp, "kill_in_save", recipe, run, "--trainer.max_steps=4", flag)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert marker.read_text() == ("moetrain-checkpoint-writer" if mode == "async" else "MainThread")
    root = run / "checkpoints"
    assert (root / "last").read_text().strip() == "step-2"
    assert (root / "step-4.tmp").is_dir() and not (root / "step-4").exists()  # killed mid-save indeed
    before = shard_tensors(root / "step-2", "model")

    assert fit(recipe, run, "--trainer.max_steps=4", "--ckpt_path=last", flag) == 0
    assert last(run).name == "step-4" and not (root / "step-4.tmp").exists()
    assert all(torch.equal(before[k], v) for k, v in shard_tensors(root / "step-2", "model").items())
    expected, got = shard_tensors(last(straight), "model"), shard_tensors(last(run), "model")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("signum,mode", [(signal.SIGTERM, "sync"), (signal.SIGINT, "sync"), (signal.SIGTERM, "async")])
def test_signal_saves_then_exits_and_resume_is_exact(setup, signum, mode, monkeypatch, capsys):
    """The signal arrives at the third micro-batch (inside step 2 of 2 micro-batches): step 2 finishes, is saved,
    and the run stops with 128 + signum; resuming to step 4 equals the uninterrupted run. With
    ``checkpoint.async`` the writer is slowed down: the save must still be complete when ``fit`` returns."""
    tmp, recipe, straight = setup
    run = tmp / f"signal-{signum}-{mode}"
    flag = f"--checkpoint.async={str(mode == 'async').lower()}"
    if mode == "async":
        save_shard = shards._save_shard

        def slow(tensors, path, metadata):
            time.sleep(0.3)
            save_shard(tensors, path, metadata)

        monkeypatch.setattr(shards, "_save_shard", slow)
    training_step = MoETrainingModule.training_step
    seen = []

    def signalling_step(self, batch, batch_idx):
        seen.append(batch_idx)
        if len(seen) == 3:
            signal.raise_signal(signum)  # delivered to this process, as kill -TERM or Ctrl-C would
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(MoETrainingModule, "training_step", signalling_step)
    assert fit(recipe, run, "--trainer.max_steps=4", "--checkpoint.every_n_steps=0", flag) == 128 + signum
    monkeypatch.setattr(MoETrainingModule, "training_step", training_step)
    assert "Traceback" not in capsys.readouterr().err
    assert len(seen) == 4 and last(run).name == "step-2"
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert signal.getsignal(signum) is not None and [r["step"] for r in metrics(run)] == [1, 2]

    assert fit(recipe, run, "--trainer.max_steps=4", "--ckpt_path=last") == 0
    expected, got = shard_tensors(last(straight), "model"), shard_tensors(last(run), "model")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(straight)]


# ---------------------------------------------------------------------------------------------- damaged
def _truncate(ckpt: Path) -> str:
    shard = ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return shard.name


def _garble_header(ckpt: Path) -> str:
    shard = sorted(ckpt.glob("optimizer-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[9:40] = b"#" * 31  # inside the JSON header
    shard.write_bytes(bytes(data))
    return shard.name


def _remove_shard(ckpt: Path) -> str:
    shard = sorted(ckpt.glob("optimizer-*.safetensors"))[0]
    shard.unlink()
    return shard.name


def _index_names_absent_tensor(ckpt: Path) -> str:
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.ghost.weight"] = index["weight_map"]["lm_head.weight"]
    index_path.write_text(json.dumps(index))
    return "model.layers.0.mlp.ghost.weight"


@pytest.mark.parametrize("damage", [_truncate, _garble_header, _remove_shard, _index_names_absent_tensor])
def test_damaged_checkpoint_is_a_clean_error(setup, damage, capsys):
    tmp, recipe, straight = setup
    run = tmp / f"damaged-{damage.__name__}"
    shutil.copytree(straight, run)
    needle = damage(run / "checkpoints" / "step-4")
    code, err = _resume_error(recipe, run, capsys)
    assert code == 2
    assert needle in err and "Traceback" not in err and err.startswith("moetrain: error:")
    assert "earlier" in err or "re-save" in err  # says what to do


def test_checkpoint_of_another_model_shape(setup, capsys):
    tmp, recipe, straight = setup
    run = tmp / "other-shape"
    shutil.copytree(straight, run)
    wider = tmp / "wider.yaml"
    wider.write_text(recipe.read_text().replace("hidden_size: 32", "hidden_size: 64"))
    code, err = _resume_error(wider, run, capsys)
    assert code == 2 and "Traceback" not in err
    assert "hidden_size" in err and "recipe.yaml" in err


def _resume_error(recipe: Path, run: Path, capsys) -> tuple[int, str]:
    """Resume from ``last`` and return (status, stderr as one line); asserts that the run directory is unchanged."""
    def snapshot() -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")
                if p.is_file()}

    before = snapshot()
    capsys.readouterr()
    code = fit(recipe, run, "--trainer.max_steps=6", "--ckpt_path=last")
    err = " ".join(capsys.readouterr().err.split())
    assert snapshot() == before, "a failed resume must not write anything"
    return code, err
