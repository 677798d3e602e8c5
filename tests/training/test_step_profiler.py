"""``profile.step`` traces the end of one optimizer step of ``moetrain fit`` and writes its summary."""

from __future__ import annotations

import json

import pytest

from moetrain.training.step_profiler import StepProfiler, kernel_breakdown


@pytest.mark.parametrize("optimizer", [False, True])
def test_fit_writes_the_profile_of_the_chosen_step(run_main, tmp_path, optimizer):
    run_dir = tmp_path / "run"
    code, err = run_main("fit", "--config", "recipes/tiny.yaml", f"--trainer.default_root_dir={run_dir}",
                         "--trainer.max_steps=3", "--model.accumulate_grad_batches=4", "--profile.step=2",
                         "--profile.micro_batches=2", f"--profile.optimizer={str(optimizer).lower()}",
                         "--checkpoint.save_final=false", "--metrics.logger=none")
    assert code == 0, err[-3000:]
    assert not (run_dir / "profile_step_1.json").exists() and not (run_dir / "profile_step_3.json").exists()
    summary = json.loads((run_dir / "profile_step_2.json").read_text())
    assert summary["step"] == 2 and summary["micro_batches"] == 2 and summary["micro_batch_s"] > 0
    # the optimizer step's range is inside the trace only when asked for
    assert (summary["optimizer_step_s"] > 0) == optimizer
    names = {op["name"] for op in summary["cpu_ops"]}
    assert any(n.startswith("aten::") for n in names), names  # the micro-batches' operators were traced
    assert set(summary["gpu"]) >= {"gpu_busy_s", "gpu_span_s", "gpu_idle_share"}  # zero on the CPU


def test_a_bad_profile_setting_is_refused_before_the_model_is_built(run_main):
    code, err = run_main("fit", "--config", "recipes/tiny.yaml", "--profile.step=0")
    assert code == 2 and "profile.step" in err and "Traceback" not in err


def test_kernel_breakdown_of_a_trace_without_gpu_kernels_is_empty():
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ones(4).add_(1)
    assert kernel_breakdown(prof) == {"gpu_busy_s": 0.0, "gpu_span_s": 0.0, "gpu_idle_share": 0.0}


@pytest.mark.parametrize("kwargs", [{"step": -1}, {"micro_batches": 0}])
def test_profiler_settings_are_checked(kwargs):
    with pytest.raises(ValueError):
        StepProfiler(**kwargs)
