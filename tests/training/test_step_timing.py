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
    assert {k for k in first if k.startswith("time/")} == {"time/forward_backward_s", "time/optimizer_s"}  # none before
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


def test_micro_batch_marks_find_the_slow_one():
    timer = StepTimer()
    for index, pause in enumerate((0.005, 0.04, 0.005)):  # the second micro-batch is slow
        timer.mark_micro(index, CPU)
        time.sleep(pause)
    timer.mark("optimizer", CPU)
    timer.mark("end", CPU)
    fig = timer.figures()
    assert fig["time/micro_batch_max_index"] == 1 and fig["time/micro_batch_max_s"] >= 0.04
    assert 0.005 <= fig["time/micro_batch_median_s"] < 0.04
    assert fig["time/micro_batch_host_max_s"] >= 0.04
    # the three add up to the forward and backward (the first micro-batch's mark is the step's start)
    assert fig["time/forward_backward_s"] >= 0.05


def test_garbage_collections_are_timed_between_reads():
    import gc

    timer = StepTimer()
    timer.figures()
    gc.collect()  # a full collection
    timer.mark("start", CPU)
    timer.mark("optimizer", CPU)
    timer.mark("end", CPU)
    fig = timer.figures()
    assert fig["host/gc_collections"] >= 1 and fig["host/gc_gen2_s"] > 0 and fig["host/gc_s"] >= fig["host/gc_gen2_s"]
    assert "time/micro_batch_max_s" not in fig  # no micro-batch was marked
    assert timer.figures()["host/gc_collections"] == 0  # counted once
