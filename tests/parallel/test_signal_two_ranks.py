"""Ctrl-C under ``trainer.devices=2`` reaching one rank only (SIGINT to the launching process, rank 0): both
ranks stop at the same step and write their shares of one checkpoint (the save is a collective), the run exits
with 130 and names the checkpoint and the resume command, and that checkpoint resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from test_fit_two_ranks import COMMON, ROOT, decisive_init


def kill_all(proc: subprocess.Popen) -> None:
    """Kill the launching process and the ranks it started (its session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # all ended already


def test_sigint_to_rank_zero_stops_both_ranks_at_one_checkpoint(tmp_path):
    run = tmp_path / "run"
    init = f"--model.init_from={decisive_init(tmp_path / 'init')}"
    args = [*COMMON, init, "--trainer.devices=2", "--parallel.expert_parallel=2", "--data.micro_batch_size=2",
            "--trainer.max_steps=1000", "--model.optimizer.max_steps=1000", f"--trainer.default_root_dir={run}"]
    # a session of its own: on failure the rank processes Lightning started are killed with it
    proc = subprocess.Popen([sys.executable, "-m", "moetrain.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_all(proc)
            raise AssertionError(f"fit ended before it was interrupted:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # rank 1 (a child process) does not receive it
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        raise AssertionError("the ranks did not stop together (one waits in a collective)") from None
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    ckpt = run / "checkpoints" / (run / "checkpoints" / "last").read_text().strip()
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert {p.name for p in ckpt.glob("model-rank*.safetensors")} == {
        "model-rank00000-00001-of-00001.safetensors", "model-rank00001-00001-of-00001.safetensors"}
    assert str(ckpt) in err and f"step {step}" in err and "--ckpt_path=last" in err, err[-3000:]
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, step + 1))

    resumed = subprocess.run([sys.executable, "-m", "moetrain.cli", *args, f"--trainer.max_steps={step + 1}",
                              "--ckpt_path=last"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "checkpoints" / "last").read_text().strip() == f"step-{step + 1}"
