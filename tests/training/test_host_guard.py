"""The host memory guard stops training with the one-paragraph error, before the OOM killer would."""

from __future__ import annotations

import pytest

from moetrain.training import host_guard
from moetrain.training.host_guard import HostMemoryGuard, HostMemoryLow, read_meminfo


def test_meminfo_is_read_where_linux_has_it():
    info = read_meminfo()
    if info is None:
        pytest.skip("no /proc/meminfo")
    available, total = info
    assert 0 < available <= total


def test_the_guard_passes_above_the_floor_and_stops_below_it():
    class Trainer:
        global_step = 3

    guard = HostMemoryGuard(reader=lambda: (10.0, 125.0))
    guard.on_train_batch_start(Trainer(), None, None, 0)  # 10 GiB free of 125: above the 1.9 GiB floor
    guard.reader = lambda: (1.5, 125.0)
    with pytest.raises(HostMemoryLow, match=r"1\.5 GiB of 125 GiB .* step 4, below the 1\.9 GiB floor"):
        guard.on_train_batch_start(Trainer(), None, None, 0)


def test_a_fit_that_runs_short_of_host_memory_stops_with_the_paragraph(run_main, tmp_path, monkeypatch):
    calls = []

    def reader():  # plenty for the first step's micro-batches, then almost nothing
        calls.append(1)
        return (0.5, 125.0) if len(calls) > 3 else (50.0, 125.0)

    monkeypatch.setattr(host_guard, "read_meminfo", reader)
    monkeypatch.setattr(HostMemoryGuard.__init__, "__defaults__", (reader,))
    code, err = run_main("fit", "--config", "recipes/tiny.yaml", f"--trainer.default_root_dir={tmp_path / 'run'}",
                         "--trainer.max_steps=4", "--model.accumulate_grad_batches=2",
                         "--checkpoint.save_final=false", "--metrics.logger=none")
    assert code != 0 and "Traceback" not in err, err[-2000:]
    err = " ".join(err.split())  # the paragraph is wrapped to the terminal
    assert "host memory ran out (0.5 GiB of 125 GiB host memory left before a micro-batch of step 2" in err
    assert "private memory grew from" in err and "cpu_budget_gb" in err
