"""step_on: auto times its two schedules on the run's own steps and keeps the faster (moetrain.offload.auto_split)."""

from __future__ import annotations

import pytest
import torch

from moetrain.offload import auto_split
from moetrain.offload.auto_split import AutoSplit


def _run(monkeypatch, durations: list[float], *, step_on: str = "auto") -> tuple[list[str], AutoSplit]:
    """Schedules of len(durations) steps whose wall times are ``durations``."""
    clock = [0.0]
    monkeypatch.setattr(auto_split.time, "perf_counter", lambda: clock[0])
    chooser = AutoSplit(step_on, torch.device("cpu"))
    schedules = []
    for seconds in durations:
        chooser.step_started()
        schedules.append(chooser.step_on())
        clock[0] += seconds
    chooser.step_started()  # the next step begins: the last one is closed
    return schedules, chooser


@pytest.mark.parametrize(("split_s", "gpu_s", "kept"), [(1.3, 1.0, "gpu"), (0.8, 1.0, "auto")])
def test_auto_times_both_schedules_twice_then_keeps_the_faster(monkeypatch, split_s, gpu_s, kept):
    schedules, chooser = _run(monkeypatch, [5.0, split_s, gpu_s, split_s + 0.1, gpu_s + 0.2, 1.0, 1.0])
    assert schedules == ["auto", "auto", "gpu", "auto", "gpu", kept, kept]
    assert chooser.seconds == {1: pytest.approx(split_s), 2: pytest.approx(gpu_s),
                               3: pytest.approx(split_s + 0.1), 4: pytest.approx(gpu_s + 0.2)}
    figures = chooser.figures()
    assert figures["offload/auto_on_gpu"] == float(kept == "gpu")
    assert figures["offload/auto_trial_split_s"] == pytest.approx(split_s)
    assert figures["offload/auto_trial_gpu_s"] == pytest.approx(gpu_s)


def test_one_slow_trial_does_not_decide(monkeypatch):
    """The all-GPU schedule's first trial is slow (an early step's noise), its second is not: the GPU is kept."""
    schedules, chooser = _run(monkeypatch, [5.0, 1.18, 1.19, 1.20, 1.00, 1.0])
    assert schedules[-1] == "gpu" and chooser.figures()["offload/auto_trial_gpu_s"] == pytest.approx(1.00)


@pytest.mark.parametrize("step_on", ["gpu", "cpu"])
def test_other_schedules_are_left_as_configured(monkeypatch, step_on):
    schedules, chooser = _run(monkeypatch, [1.0, 2.0, 3.0, 4.0], step_on=step_on)
    assert schedules == [step_on] * 4 and chooser.figures() == {}


def test_a_run_shorter_than_the_trials_keeps_the_split(monkeypatch):
    schedules, chooser = _run(monkeypatch, [1.0, 1.0, 1.0, 1.0])
    assert schedules == ["auto", "auto", "gpu", "auto"] and chooser.choice is None
