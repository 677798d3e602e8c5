"""The step timer on CUDA: events on the compute stream, read without waiting for the GPU.

Run on the GPU machine: ``python -m pytest -q tests/gpu/test_step_timing_cuda.py``.
"""

import pytest
import torch

from moetrain.training.step_timing import StepTimer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


def test_figures_are_the_gpu_clock_and_never_wait():
    timer = StepTimer()
    for _ in range(2):
        timer.mark("start", CUDA)
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued while the host runs on
        timer.mark("optimizer", CUDA)
        torch.cuda._sleep(50_000_000)
        timer.mark("end", CUDA)
        assert timer.figures() == {}  # the end is still queued: nothing is read, nothing waits
        torch.cuda.synchronize()
    got = timer.figures()
    assert got["time/forward_backward_s"] > 2 * got["time/optimizer_s"] > 0
    assert 0 <= got["time/between_steps_s"] < got["time/forward_backward_s"]
