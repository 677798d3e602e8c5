"""``python -m moetrain.bench.compare_profiles``: two traced profiles set side by side, per micro-batch."""

from __future__ import annotations

import json

import pytest

from moetrain.bench.compare_profiles import main


def _summary(micro_batches: int, kernels: dict[str, tuple[float, int]], busy: float) -> dict:
    return {"micro_batches": micro_batches, "micro_batch_s": busy / micro_batches,
            "gpu": {"gpu_gemm_s": sum(s for s, _ in kernels.values()), "gpu_busy_s": busy, "gpu_span_s": busy,
                    "gpu_idle_share": 0.0},
            "kernels": [{"name": n, "calls": c, "s": s} for n, (s, c) in kernels.items()],
            "idle": {"gaps": 0, "total_s": 0.0, "longest_s": 0.0}}


def test_a_fit_profile_and_a_compute_only_result_compare_per_micro_batch(tmp_path):
    # the fit traced 2 micro-batches, compute-only 4: each side is divided by its own count
    fit = _summary(2, {"gemm_a": (0.020, 4), "cast": (0.006, 2)}, busy=0.026)
    compute = {"step_s": 1.0, "profile_2_micro_batches": _summary(4, {"gemm_a": (0.040, 8)}, busy=0.040)}
    (tmp_path / "fit.json").write_text(json.dumps(fit))
    (tmp_path / "compute.json").write_text(json.dumps(compute))
    text = main([str(tmp_path / "fit.json"), str(tmp_path / "compute.json"), "--top", "5"])
    rows = text.splitlines()
    kernels = rows[rows.index(next(r for r in rows if r.startswith("kernels that differ"))) + 1:]
    # the cast is the fit's only extra (3 ms a micro-batch); the GEMM costs 10 ms a micro-batch on both sides
    assert kernels[0].split()[0] == "+3.000" and kernels[0].endswith("cast")
    assert kernels[1].split()[:3] == ["+0.000", "10.000", "10.000"]
    busy = next(r for r in rows if r.startswith("GPU busy")).split()
    assert busy[2:] == ["13.00", "10.00", "+3.00"]


def test_a_file_without_a_profile_is_named(tmp_path):
    (tmp_path / "plain.json").write_text(json.dumps({"step_s": 1.0}))
    with pytest.raises(SystemExit, match="plain.json"):
        main([str(tmp_path / "plain.json"), str(tmp_path / "plain.json")])
