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


def _event(name, start, end, *, gpu=False, children=()):
    """A real profiler event (the class ``prof.events()`` yields) over [start, end) microseconds."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    ev = FunctionEvent(id=0, name=name, thread=0, start_us=start, end_us=end,
                       device_type=DeviceType.CUDA if gpu else DeviceType.CPU)
    for child in children:
        ev.append_cpu_child(child)
    return ev


def test_idle_gaps_name_the_host_operator_the_gpu_waited_on():
    """Kernels busy 0-100 and 400-500 and 520-600 us: one gap of 300 us (the 20 us one is under the threshold). The
    host spent 50-350 in ``step`` whose child ``aten::item`` (a sync) ran 100-330: the gap is item's 230 us and
    step's own 20 (the parts of 330-400 outside any operator count for none)."""
    from moetrain.training.step_profiler import idle_gaps

    item = _event("aten::item", 100, 330)
    events = [_event("k1", 0, 100, gpu=True), _event("k2", 400, 500, gpu=True), _event("k3", 520, 600, gpu=True),
              _event("step", 50, 350, children=[item]), item, _event("aten::mm", 360, 370),
              _event("aten::add", 505, 515)]
    out = idle_gaps(events)
    assert out["gaps"] == 1 and out["total_s"] == pytest.approx(300e-6) and out["longest_s"] == pytest.approx(300e-6)
    owners = {o["name"]: o["s"] for o in out["by_host_op"]}
    assert owners == pytest.approx({"aten::item": 230e-6, "step": 20e-6, "aten::mm": 10e-6})
    assert [o["name"] for o in out["by_host_op"]][0] == "aten::item"
    assert idle_gaps(events[:1]) == {"gaps": 0, "total_s": 0.0, "longest_s": 0.0, "by_host_op": []}
