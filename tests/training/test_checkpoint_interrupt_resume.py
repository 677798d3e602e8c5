"""A real Ctrl-C: SIGINT to a ``moetrain fit`` process on recipes/tiny.yaml, then the resume command it prints;
and a second Ctrl-C, which stops at once and says where the run stands.

The interrupted run must say on stderr that it stopped, which checkpoint it saved and how to resume; that
command, run as printed (plus the step budget of the comparison), must give a metrics.jsonl equal, step by
step, to the uninterrupted run's: the same ``tokens`` (the count the checkpoint carries on) and the same
losses, learning rate and gradient norm; and the checkpoint's trainer state holds one token count.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ckpt_harness import REPO, TINY, metrics

from moetrain.cli import main
from moetrain.training.module import MoETrainingModule

SMALL = {"vocab_size": 768, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 4, "moe_intermediate_size": 16}
# a schedule that does not depend on trainer.max_steps, so that runs stopped at different steps agree step by step
OVERRIDES = ["--trainer.accelerator=cpu", f"--model.config={json.dumps(SMALL)}", "--model.accumulate_grad_batches=2",
             "--model.optimizer.max_steps=1000", f"--data.path={TINY / 'val.jsonl'}",
             f"--data.tokenizer={TINY / 'tokenizer'}", "--data.seq_len=32",
             "--data.micro_batch_size=2", "--checkpoint.every_n_steps=0"]
FIELDS = ("step", "tokens", "loss", "ce_loss", "aux_loss", "lr", "grad_norm")
MODULE = [sys.executable, "-m", "moetrain.cli"]


def fit_args(run_dir: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "recipes" / "tiny.yaml"), *OVERRIDES,
            f"--trainer.default_root_dir={run_dir}", *extra]


def interrupt_after(args: list[str], run_dir: Path, logged_steps: int) -> subprocess.CompletedProcess:
    """Start ``moetrain ARGS``, send SIGINT once ``logged_steps`` lines are in metrics.jsonl, wait for the end."""
    proc = subprocess.Popen(MODULE + args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (path.is_file() and len(path.read_text().splitlines()) >= logged_steps):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"fit ended before it was interrupted:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_names_checkpoint_and_resume_equals_uninterrupted_run(tmp_path):
    run, straight = tmp_path / "run", tmp_path / "straight"
    stopped = interrupt_after(fit_args(run, "--trainer.max_steps=1000"), run, logged_steps=3)
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr

    state = json.loads((run / "checkpoints" / (run / "checkpoints" / "last").read_text().strip()
                        / "trainer_state.json").read_text())
    step = state["step"]
    assert step >= 3
    ckpt = run / "checkpoints" / f"step-{step}"
    # stderr: that Ctrl-C stopped it, the checkpoint saved, and the command that resumes
    err = stopped.stderr
    assert "Ctrl-C" in err and f"step {step}" in err and str(ckpt) in err, err[-3000:]
    printed = [line.strip() for line in err.splitlines() if line.strip().startswith("moetrain fit ")]
    assert len(printed) == 1 and printed[0].endswith("--ckpt_path=last"), err[-3000:]
    # one token count in the trainer state, whichever callback saved it
    assert all(v.get("tokens", state["tokens"]) == state["tokens"] for v in state["callbacks"].values())
    assert [r["step"] for r in metrics(run)] == list(range(1, step + 1))
    assert metrics(run)[-1]["tokens"] == state["tokens"]

    end = step + 3
    resumed = subprocess.run(MODULE + shlex.split(printed[0])[1:] + [f"--trainer.max_steps={end}"], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = subprocess.run(MODULE + fit_args(straight, f"--trainer.max_steps={end}"), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    expected, got = metrics(straight), metrics(run)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, end + 1))
    assert [r["tokens"] for r in expected] == [r["step"] * 2 * 2 * 32 for r in expected]  # 2 micro-batches (2, 32)
    for a, b in zip(expected, got, strict=True):
        assert {k: a[k] for k in FIELDS} == {k: b[k] for k in FIELDS}, a["step"]


@pytest.mark.parametrize("checkpoint_every", [2, 0])
def test_second_ctrl_c_stops_at_once_and_says_where_the_run_stands(tmp_path, monkeypatch, capsys, checkpoint_every):
    """Two SIGINTs inside step 3 (the second before the step ends): fit stops at once with 130, nothing of step 3
    is saved, and stderr names the newest checkpoint and the command to resume from it; without any checkpoint,
    the command that starts the run again (which then runs)."""
    run = tmp_path / "run"
    seen = []
    training_step = MoETrainingModule.training_step

    def twice_in_step_three(self, batch, batch_idx):
        seen.append(batch_idx)
        if len(seen) == 5:  # the first micro-batch of step 3 (2 micro-batches a step)
            signal.raise_signal(signal.SIGINT)  # delivered to this process, as Ctrl-C is
            signal.raise_signal(signal.SIGINT)
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(MoETrainingModule, "training_step", twice_in_step_three)
    args = fit_args(run, "--trainer.max_steps=6", f"--checkpoint.every_n_steps={checkpoint_every}")
    handler = signal.getsignal(signal.SIGINT)
    threads = torch.get_num_threads()
    try:
        code = main(args)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after a KeyboardInterrupt
        torch.set_num_threads(threads)
    monkeypatch.setattr(MoETrainingModule, "training_step", training_step)
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGINT and "Traceback" not in err
    assert len(seen) == 5 and [r["step"] for r in metrics(run)] == [1, 2]
    assert "received twice" in err and not list((run / "checkpoints").glob("*.tmp"))
    command = [line.strip() for line in err.splitlines() if line.strip().startswith("moetrain fit ")]
    assert len(command) == 1
    if checkpoint_every:
        assert str(run / "checkpoints" / "step-2") in err and command[0].endswith("--ckpt_path=last")
        assert (run / "checkpoints" / "last").read_text().strip() == "step-2"
    else:
        assert "no checkpoint" in err and command[0].endswith("--overwrite_run=true")
        threads = torch.get_num_threads()
        try:
            assert main(shlex.split(command[0])[1:]) == 0
        finally:
            torch.set_num_threads(threads)
        assert [r["step"] for r in metrics(run)] == list(range(1, 7))
