"""Compare two traced profiles kernel by kernel, per micro-batch: where one run's GPU time goes and the other's not.

Each input is either a fit's ``profile_step_N.json`` (``profile.step: N``) or a compute-only result
(``python -m moetrain.bench.compute_only --profile --out DIR`` writes ``compute_only_NAME.json``, whose
``profile_2_micro_batches`` is the same summary). Both are divided by the micro-batches they traced, so a fit's
micro-batch is set against compute-only's. Printed: the kernel families, the GPU's busy time, span and idle gaps,
then the kernels whose time differs most (milliseconds and calls a micro-batch, first input minus second).

    python -m moetrain.bench.compare_profiles RUN/profile_step_6.json OUT/compute_only_deepseek-moe-16b.json --top 30
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def load_summary(path: str) -> dict[str, Any]:
    """The profile summary in ``path`` (a fit's ``profile_step_N.json`` or a compute-only result)."""
    data = json.loads(Path(path).read_text())
    summary = data.get("profile_2_micro_batches", data)
    if "kernels" not in summary or "gpu" not in summary:
        raise SystemExit(f"{path}: no profile summary (expected a profile_step_N.json or a compute-only result "
                         "run with --profile)")
    return summary


def per_micro_batch(summary: dict[str, Any]) -> dict[str, Any]:
    """Milliseconds (and calls) a micro-batch: ``families``, ``busy``/``span``/``idle_gaps`` and ``kernels``
    (name -> (ms, calls))."""
    n = max(1, int(summary.get("micro_batches", 1)))
    gpu = summary["gpu"]
    families = {k[4:-2]: 1e3 * v / n for k, v in gpu.items()
                if k.startswith("gpu_") and k.endswith("_s") and k not in ("gpu_busy_s", "gpu_span_s")}
    kernels: dict[str, tuple[float, float]] = {}
    for row in summary["kernels"]:
        ms, calls = kernels.get(row["name"], (0.0, 0.0))
        kernels[row["name"]] = (ms + 1e3 * row["s"] / n, calls + row["calls"] / n)
    idle = summary.get("idle", {})
    return {"families": families, "busy": 1e3 * gpu.get("gpu_busy_s", 0.0) / n,
            "span": 1e3 * gpu.get("gpu_span_s", 0.0) / n, "idle_gaps": 1e3 * idle.get("total_s", 0.0) / n,
            "wall": 1e3 * summary["micro_batch_s"] if "micro_batch_s" in summary else None, "kernels": kernels}


def kernel_differences(a: dict[str, tuple[float, float]], b: dict[str, tuple[float, float]],
                       top: int) -> list[tuple[str, float, float, float, float]]:
    """(name, a ms, b ms, a calls, b calls) of the ``top`` kernels whose time differs most."""
    rows = [(name, a.get(name, (0.0, 0.0))[0], b.get(name, (0.0, 0.0))[0], a.get(name, (0.0, 0.0))[1],
             b.get(name, (0.0, 0.0))[1]) for name in set(a) | set(b)]
    return sorted(rows, key=lambda r: -abs(r[1] - r[2]))[:top]


def report(a: dict[str, Any], b: dict[str, Any], *, top: int, names: tuple[str, str]) -> str:
    """The comparison as text (milliseconds a micro-batch)."""
    lines = [f"{'per micro-batch (ms)':<40} {names[0]:>12} {names[1]:>12} {'difference':>11}"]

    def row(label: str, x: float | None, y: float | None) -> None:
        if x is None or y is None:
            return
        lines.append(f"{label:<40} {x:12.2f} {y:12.2f} {x - y:+11.2f}")

    row("wall", a["wall"], b["wall"])
    row("GPU span", a["span"], b["span"])
    row("GPU busy", a["busy"], b["busy"])
    row("GPU idle gaps (>= 50 us)", a["idle_gaps"], b["idle_gaps"])
    for fam in sorted(set(a["families"]) | set(b["families"]),
                      key=lambda f: -max(a["families"].get(f, 0.0), b["families"].get(f, 0.0))):
        row(f"  {fam}", a["families"].get(fam, 0.0), b["families"].get(fam, 0.0))
    lines.append("")
    lines.append(f"kernels that differ most (ms, calls a micro-batch: {names[0]} / {names[1]})")
    for name, x, y, cx, cy in kernel_differences(a["kernels"], b["kernels"], top):
        lines.append(f"{x - y:+9.3f}  {x:9.3f} {y:9.3f}  {cx:7.1f} {cy:7.1f}  {name[:110]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", help="profile summary (profile_step_N.json or compute_only_NAME.json)")
    p.add_argument("second", help="the summary to compare against")
    p.add_argument("--top", type=int, default=30, help="kernels to list")
    a = p.parse_args(argv)
    text = report(per_micro_batch(load_summary(a.first)), per_micro_batch(load_summary(a.second)), top=a.top,
                  names=(Path(a.first).stem[:12], Path(a.second).stem[:12]))
    print(text)
    return text


if __name__ == "__main__":
    main()
