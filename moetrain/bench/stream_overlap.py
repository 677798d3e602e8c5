"""Where an offloaded step's time goes, from a CUDA trace: how long the host-to-device copies, the
device-to-host copies and the compute kernels kept the GPU busy, and how much of it ran at once.

Used by :mod:`moetrain.bench.offload_step` (``--profile``): one extra step runs under
``torch.profiler`` and the intervals of its device activities are merged here. The figures answer
"do page-ins and page-outs use the link in both directions at once, and do they hide under compute?"
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from moetrain.training.step_profiler import length, union


def _intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def overlap_summary(events: list[tuple[str, float, float]]) -> dict[str, float]:
    """``events``: (kind, start_us, end_us) with kind ``h2d``, ``d2h`` or ``kernel``.

    Returns seconds busy per kind, seconds where both copy directions ran, where copies ran under
    compute, and the span of the trace.
    """
    by = {k: union([(s, e) for kind, s, e in events if kind == k]) for k in ("h2d", "d2h", "kernel")}
    copies = union(by["h2d"] + by["d2h"])
    span = (max(e for _, _, e in events) - min(s for _, s, _ in events)) if events else 0.0
    return {
        "span_s": span / 1e6,
        "h2d_busy_s": length(by["h2d"]) / 1e6,
        "d2h_busy_s": length(by["d2h"]) / 1e6,
        "compute_busy_s": length(by["kernel"]) / 1e6,
        "both_directions_s": length(_intersect(by["h2d"], by["d2h"])) / 1e6,
        "copies_busy_s": length(copies) / 1e6,
        "copies_under_compute_s": length(_intersect(copies, by["kernel"])) / 1e6,
    }


def paging_window(events: list[tuple[str, float, float]]) -> dict[str, float]:
    """The paging window of ``events`` (as :func:`overlap_summary`'s): from the first copy to the last one, the
    seconds in which the link ran both ways, one way only, or not at all, and how much of the link's idle time the
    GPU computed (a copy waiting on a step kernel) or sat idle too (a copy waiting on the host)."""
    copies = [(s, e) for kind, s, e in events if kind in ("h2d", "d2h")]
    if not copies:
        return {}
    lo, hi = min(s for s, _ in copies), max(e for _, e in copies)
    inside = [(k, max(s, lo), min(e, hi)) for k, s, e in events if e > lo and s < hi]
    by = {k: union([(s, e) for kind, s, e in inside if kind == k]) for k in ("h2d", "d2h", "kernel")}
    busy = union(by["h2d"] + by["d2h"])
    idle = [(s, e) for s, e in zip([lo] + [e for _, e in busy], [s for s, _ in busy] + [hi], strict=True) if e > s]
    both = length(_intersect(by["h2d"], by["d2h"]))
    return {
        "window_s": (hi - lo) / 1e6,
        "both_ways_s": both / 1e6,
        "one_way_s": (length(busy) - both) / 1e6,
        "link_idle_s": length(idle) / 1e6,
        "link_idle_gpu_busy_s": length(_intersect(idle, by["kernel"])) / 1e6,
    }


def profile_step(run_step: Callable[[], None], *, trace: Optional[Path] = None) -> dict[str, float]:
    """Run ``run_step`` once under the CUDA profiler and summarise its copies and kernels (``paging_window``:
    :func:`paging_window`). ``trace``: also record the host's operators and write the step's Chrome trace there
    (``.json.gz``; streams are its GPU rows)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if trace is not None else [])
    with profile(activities=activities) as prof:
        run_step()
        torch.cuda.synchronize()
    if trace is not None:
        raw = trace.with_suffix("")  # name.json
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    events = []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.name.lower()
        start, end = e.time_range.start, e.time_range.end
        if "memcpy" in name:
            kind = "h2d" if "htod" in name else "d2h" if "dtoh" in name else None
            if kind is None:
                continue  # device-to-device
            events.append((kind, start, end))
        elif "memset" not in name:
            events.append(("kernel", start, end))
    return overlap_summary(events) | {"paging_window": paging_window(events)}
