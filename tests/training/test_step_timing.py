"""The step timer's figures on the CPU (the host's clock): each part is the time between its two marks."""

import time

import pytest
import torch

from moetrain.training.step_timing import StepTimer

CPU = torch.device("cpu")


def test_parts_are_the_times_between_marks():
    timer = StepTimer()
    assert timer.figures() == {}
    timer.mark("start", CPU)
    time.sleep(0.02)
    timer.mark("optimizer", CPU)
    assert timer.figures() == {}  # the step has not ended
    time.sleep(0.01)
    timer.mark("end", CPU)
    first = timer.figures()
    assert set(first) == {"time/forward_backward_s", "time/optimizer_s"}  # no step before it
    assert first["time/forward_backward_s"] >= 0.02 and first["time/optimizer_s"] >= 0.01
    time.sleep(0.03)
    timer.mark("start", CPU)
    assert timer.figures() == {}  # a new step, not yet ended
    timer.mark("optimizer", CPU)
    timer.mark("end", CPU)
    second = timer.figures()
    assert second["time/between_steps_s"] >= 0.03
    assert second["time/forward_backward_s"] < 0.02


def test_unknown_mark_is_refused():
    with pytest.raises(AssertionError):
        StepTimer().mark("backward", CPU)
