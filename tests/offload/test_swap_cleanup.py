"""Swap files live exactly as long as the process that made them.

A swap file holds the experts' whole optimizer state (57 GiB for DeepSeek-MoE-16B), so a run must delete it when
it ends: normally, with an error, on Ctrl-C or SIGTERM. A process killed outright (SIGKILL, the OOM killer) cannot;
the next start that uses the folder reports and deletes what it left, and never touches a live process's file.

The runs use ``nvme_backend=threads`` so that they do not depend on DeepSpeed's async_io op having been built here
(the cleanup is the same for both backends).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moetrain.cli import main
from moetrain.offload.nvme import SwapFile, find_stale_swap_files, remove_stale_swap_files

REPO = Path(__file__).resolve().parents[2]
NVME = ["--model.offload.placement.tier=nvme", "--model.offload.nvme.backend=threads"]


def swap_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("moetrain-experts-*.swp"))


def moetrain_command() -> list[str]:
    script = Path(sys.executable).parent / "moetrain"
    return [str(script)] if script.exists() else [sys.executable, "-m", "moetrain.cli"]


def start_fit(run_dir: Path, swap: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*moetrain_command(), "fit", "--config", "recipes/tiny.yaml",
                             f"--trainer.default_root_dir={run_dir}", *NVME, f"--model.offload.nvme.path={swap}",
                             *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.1)


def training(run_dir: Path, swap: Path):
    """True once the run holds its swap file and has logged a step (its signal handlers are in place then)."""
    metrics = run_dir / "metrics.jsonl"
    return lambda: bool(swap_files(swap)) and metrics.is_file() and metrics.read_text().strip() != ""


def test_a_finished_run_deletes_its_swap_file(repo_cwd, tmp_path, capsys):
    swap = tmp_path / "swap"
    swap.mkdir()
    status = main(["fit", "--config", "recipes/tiny.yaml", f"--trainer.default_root_dir={tmp_path / 'run'}",
                   "--trainer.max_steps=2", *NVME, f"--model.offload.nvme.path={swap}"])
    assert status == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "step-2").is_dir()
    assert swap_files(swap) == []


def test_a_failed_run_deletes_its_swap_file(repo_cwd, tmp_path, capsys):
    """An error once training runs (the first checkpoint cannot be written: ``checkpoints`` is a file) cleans up."""
    swap, run_dir = tmp_path / "swap", tmp_path / "run"
    swap.mkdir()
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("")
    status = main(["fit", "--config", "recipes/tiny.yaml", f"--trainer.default_root_dir={run_dir}",
                   "--trainer.max_steps=3", "--checkpoint.every_n_steps=1", *NVME, f"--model.offload.nvme.path={swap}"])
    err = " ".join(capsys.readouterr().err.split())
    assert status == 2 and "writing checkpoint step-1 failed" in err, err
    assert swap_files(swap) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_run_stopped_by_a_signal_deletes_its_swap_file(signum, tmp_path):
    swap, run_dir = tmp_path / "swap", tmp_path / "run"
    swap.mkdir()
    proc = start_fit(run_dir, swap, "--trainer.max_steps=100000", "--checkpoint.save_final=false")
    wait_for(training(run_dir, swap), proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-3000:]  # stopped at a step boundary, after its checkpoint
    assert "Traceback" not in err
    assert swap_files(swap) == []


SWAP_HOLDER = textwrap.dedent("""
    import sys, time
    from moetrain.offload.nvme import SwapFile
    swap = SwapFile(sys.argv[1], 1 << 20, backend="threads")
    print(swap.path, flush=True)
    if sys.argv[2] == "raise":
        raise RuntimeError("an error after the swap file exists")
    for _ in range(3000):  # short sleeps: a signal that lands on a worker thread does not cut a long one short
        time.sleep(0.1)
""")


def hold_swap_file(folder: Path, mode: str = "wait") -> tuple[subprocess.Popen, Path]:
    """A process that creates a swap file the way the store does, prints its path and waits (or raises)."""
    proc = subprocess.Popen([sys.executable, "-c", SWAP_HOLDER, str(folder), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line, proc.communicate()[1][-3000:]
    return proc, Path(line)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_outside_training_deletes_the_swap_file(signum, tmp_path):
    """SIGTERM's default action ends a process without running exit handlers; the swap file must go anyway (and the
    process must still end by the signal). Ctrl-C raises KeyboardInterrupt, which unwinds to the exit handler."""
    proc, file = hold_swap_file(tmp_path)
    assert file.is_file()
    proc.send_signal(signum)
    proc.communicate(timeout=60)
    assert proc.returncode == -signum  # Python ends an uncaught KeyboardInterrupt by SIGINT too
    assert swap_files(tmp_path) == []


def test_an_uncaught_error_deletes_the_swap_file(tmp_path):
    proc, _ = hold_swap_file(tmp_path, mode="raise")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "an error after the swap file exists" in err
    assert swap_files(tmp_path) == []


def test_a_live_process_swap_file_is_never_taken_for_stale(tmp_path):
    proc, file = hold_swap_file(tmp_path)
    try:
        assert find_stale_swap_files(tmp_path) == []
        assert remove_stale_swap_files(tmp_path) == []
        assert file.is_file()
        ours = SwapFile(str(tmp_path), 1 << 20, backend="threads")  # this process's own file is live too
        assert find_stale_swap_files(tmp_path) == []
        ours.close()
    finally:
        proc.kill()
        proc.communicate(timeout=60)


def test_a_killed_run_leaves_a_swap_file_that_the_next_start_reports_and_deletes(repo_cwd, tmp_path, capsys):
    swap, run_dir = tmp_path / "swap", tmp_path / "killed"
    swap.mkdir()
    proc = start_fit(run_dir, swap, "--trainer.max_steps=100000")
    wait_for(lambda: bool(swap_files(swap)), proc)
    (left,) = swap_files(swap)
    proc.send_signal(signal.SIGKILL)  # nothing runs in the process after this: the file stays
    proc.communicate(timeout=60)
    assert swap_files(swap) == [left]
    assert str(proc.pid) in left.name

    status = main(["fit", "--config", "recipes/tiny.yaml", f"--trainer.default_root_dir={tmp_path / 'next'}",
                   "--trainer.max_steps=1", *NVME, f"--model.offload.nvme.path={swap}"])
    err = " ".join(capsys.readouterr().err.split())
    assert status == 0, err
    assert f"deleted 1 stale swap file(s) in {swap}" in err and left.name in err and f"process {proc.pid}" in err
    assert swap_files(swap) == []


def test_stale_swap_files_are_reported_before_the_model_is_built(repo_cwd, tmp_path, capsys):
    """The report comes from the start-up checks, so a run that fails them still frees the disk and says so."""
    proc, file = hold_swap_file(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert file.is_file()
    status = main(["fit", "--config", "recipes/tiny.yaml", f"--trainer.default_root_dir={tmp_path / 'run'}",
                   *NVME, f"--model.offload.nvme.path={tmp_path}", "--trainer.max_steps=-5"])
    err = " ".join(capsys.readouterr().err.split())
    assert status == 2 and "trainer.max_steps" in err
    assert file.name in err and not file.exists()
