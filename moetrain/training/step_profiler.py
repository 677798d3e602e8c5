"""Where one optimizer step's time goes: ``profile.step: N`` traces the end of step N of a ``moetrain fit``.

The trace covers ``profile.micro_batches`` micro-batches of the step, the ones right before its last: what each
micro-batch's forward and backward cost in a real ``fit`` (hooks, autocast, the engine's bookkeeping included).
With ``profile.optimizer: true`` it covers the step's last micro-batches and its optimizer step instead (clipping,
the dense AdamW, the experts' paging and step); tracing the optimizer step of a 16 B-parameter model takes minutes
(a million events), and ``offload/step_s`` in ``metrics.jsonl`` times it anyway. A whole step of a large model is
millions of events; its micro-batches are alike, so two of them say what each costs. The summary goes to
``profile_step_N.json`` in the run directory:

* ``gpu``: seconds of GPU kernel time by kernel family (GEMMs, grouped GEMMs, attention, the loss, copies,
  reductions and sorts, elementwise), the busy time (the union of every kernel), the span, and the share of the
  span the GPU sat idle: a host-bound step shows it there;
* ``micro_batch_s``: the traced micro-batches' wall time, per micro-batch;
* ``optimizer_step_s``: the wall time of the optimizer step (its ``moetrain.optimizer_step`` range; 0 unless
  ``profile.optimizer: true``);
* ``cpu_ops``: the host operators with the most self time (Python-side overhead shows as many small ones);
* ``kernels``: the GPU kernels by time (up to 250 names: every kernel of a micro-batch, to compare traces);
* ``idle``: the GPU's idle gaps of at least 50 us (count, total, longest) and ``by_host_op``: the host operators
  whose own time overlaps those gaps the most: what the host was doing while the GPU waited for work (a host
  sync, a slow Python path, a blocking copy).

It runs on the CPU as well (no GPU part then). The trace itself (Chrome format) is kept with ``profile.trace:
true``; it can be large.
"""

from __future__ import annotations

import bisect
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.autograd.profiler_util import FunctionEvent

OPTIMIZER_RANGE = "moetrain.optimizer_step"
"""The ``torch.profiler.record_function`` range the training module wraps its optimizer step in."""

KERNEL_FAMILIES = (  # first match wins: (family, substrings of a kernel's name, lower case)
    # attention first: cuDNN's flash kernels are named ``..._sdpa_sm90_flash_..._wgmma_...``, and "wgmma" holds "gmm"
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("grouped_gemm", ("grouped", "group_gemm", "gmm")),
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul", "sgemm", "hgemm")),
    ("loss_softmax", ("softmax", "cross_entropy", "nll", "logsumexp")),
    ("copy", ("memcpy", "memset", "copy")),
    ("reduce_sort_scatter", ("reduce", "sort", "scatter", "gather", "index", "cumsum", "histc", "bincount", "topk")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "silu", "mul", "add", "fill")),
)


def family(name: str) -> str:
    """The kernel family (:data:`KERNEL_FAMILIES`) a GPU kernel's name belongs to, ``other`` if none."""
    low = name.lower()
    for fam, keys in KERNEL_FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """``intervals`` (start, end) merged into disjoint ones, in order."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(intervals: list[tuple[float, float]]) -> float:
    """Total length of disjoint ``intervals``."""
    return sum(end - start for start, end in intervals)


def kernel_breakdown(prof: torch.profiler.profile) -> dict[str, float]:
    """Seconds of GPU kernel time per family, the busy union, the span and the idle share of a trace."""
    spans: list[tuple[float, float]] = []
    per: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        spans.append((ev.time_range.start, ev.time_range.end))
        per[family(ev.name)] += (ev.time_range.end - ev.time_range.start) / 1e6
    busy = length(union(spans))
    span = (max(e for _, e in spans) - min(s for s, _ in spans)) if spans else 0.0
    out = {f"gpu_{k}_s": round(v, 4) for k, v in sorted(per.items(), key=lambda kv: -kv[1])}
    out.update(gpu_busy_s=round(busy / 1e6, 4), gpu_span_s=round(span / 1e6, 4),
               gpu_idle_share=round(1 - busy / span, 4) if span else 0.0)
    return out


def idle_gaps(events: Sequence[FunctionEvent], *, min_us: float = 50.0, top: int = 12) -> dict[str, Any]:
    """The GPU's idle gaps of at least ``min_us`` between the kernels of a trace's ``events`` (``prof.events()``),
    and the host operators whose self time overlaps them most (seconds of gap per operator name; an operator's time
    in its children is the children's)."""
    kernels = [(e.time_range.start, e.time_range.end) for e in events
               if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = union(kernels)
    gaps = [(busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1) if busy[i + 1][0] - busy[i][1] >= min_us]
    out: dict[str, Any] = {"gaps": len(gaps), "total_s": round(length(gaps) / 1e6, 6),
                           "longest_s": round(max((e - s for s, e in gaps), default=0.0) / 1e6, 6)}
    if not gaps:
        return out | {"by_host_op": []}
    starts, ends = [s for s, _ in gaps], [e for _, e in gaps]
    overlap: dict[int, float] = {}
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    for ev in cpu:  # each event's overlap with the gaps: the gaps it touches are a run found by bisection
        s, e = ev.time_range.start, ev.time_range.end
        lo, hi = bisect.bisect_right(ends, s), bisect.bisect_left(starts, e)
        overlap[id(ev)] = sum(max(0.0, min(e, ends[i]) - max(s, starts[i])) for i in range(lo, hi))
    by_name: dict[str, float] = defaultdict(float)
    for ev in cpu:
        own = overlap[id(ev)] - sum(overlap.get(id(c), 0.0) for c in ev.cpu_children)
        if own > 0:
            by_name[ev.name] += own
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return out | {"by_host_op": [{"name": n[:120], "s": round(v / 1e6, 6)} for n, v in ranked]}


def summarize(prof: torch.profiler.profile, *, top: int = 15, top_kernels: int = 250) -> dict[str, Any]:
    """The ``profile_step_N.json`` summary of a trace (see the module docstring): ``top`` host operators and
    ``top_kernels`` GPU kernels (enough to hold every kernel name of a micro-batch, so two summaries can be compared
    kernel by kernel: ``python -m moetrain.bench.compare_profiles``)."""
    events = prof.key_averages()
    cpu_ops = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: -e.self_device_time_total)[:top_kernels]
    opt = [e for e in prof.events() if e.name == OPTIMIZER_RANGE and e.device_type == torch.autograd.DeviceType.CPU]
    return {
        "gpu": kernel_breakdown(prof),
        "optimizer_step_s": round(sum(e.time_range.elapsed_us() for e in opt) / 1e6, 4),
        "cpu_ops": [{"name": e.key, "calls": e.count, "self_s": round(e.self_cpu_time_total / 1e6, 4)}
                    for e in cpu_ops],
        "kernels": [{"name": e.key[:160], "calls": e.count, "s": round(e.self_device_time_total / 1e6, 6)}
                    for e in kernels],
        "idle": idle_gaps(prof.events()),
    }


class StepProfiler(Callback):
    """Trace the end of optimizer step ``step`` (1-based) and write its summary (see the module docstring)."""

    def __init__(self, step: Optional[int] = None, micro_batches: int = 2, optimizer: bool = False,
                 trace: bool = False) -> None:
        """
        Args:
            step: the optimizer step to trace (None: none). Step 1 includes one-time warm-up costs; 3 or later
                shows the steady state.
            micro_batches: how many micro-batches the trace covers (the ones before the step's last; fewer if the
                step has fewer).
            optimizer: trace the step's last micro-batches and its optimizer step instead (minutes at 16 B).
            trace: also write the Chrome trace ``profile_step_N.trace.json`` (large for big models).
        """
        if step is not None and step < 1:
            raise ValueError(f"profile.step must be >= 1 (an optimizer step, counted from 1), got {step}")
        if micro_batches < 1:
            raise ValueError(f"profile.micro_batches must be >= 1, got {micro_batches}")
        self.step = step
        self.micro_batches = micro_batches
        self.optimizer = optimizer
        self.trace = trace
        self._traced = 0  # micro-batches in the trace
        self._t0 = 0.0
        self._prof: Optional[torch.profiler.profile] = None
        self.summary: Optional[dict[str, Any]] = None

    def _window(self, accumulate: int) -> tuple[int, int]:
        """(first, end): the step's micro-batches ``first .. end - 1`` are traced; ``end == accumulate`` takes the
        optimizer step in (``profile.optimizer``, or a step of one micro-batch, which has nothing before its last)."""
        if self.optimizer or accumulate == 1:
            return max(0, accumulate - self.micro_batches), accumulate
        return max(0, accumulate - 1 - self.micro_batches), accumulate - 1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.step is None or trainer.global_step + 1 != self.step:
            return
        first, end = self._window(pl_module.accumulate_grad_batches)
        if self._prof is not None:
            if pl_module.micro_batch == end:  # the micro-batches are done; the step's last is not traced
                self._finish(trainer, pl_module)
            return
        if pl_module.micro_batch != first or self.summary is not None:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self._traced = end - first
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._prof is None or trainer.global_step < self.step:
            return
        self._finish(trainer, pl_module)  # the optimizer step was in the trace

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.summary = {"step": self.step, "micro_batches": self._traced,
                        "micro_batch_s": round(wall / max(1, self._traced), 4), **summarize(prof)}
        if trainer.is_global_zero:
            out = Path(trainer.default_root_dir) / f"profile_step_{self.step}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(self.summary, indent=1) + "\n")
            if self.trace:
                prof.export_chrome_trace(str(out.with_suffix(".trace.json")))
            gpu = self.summary["gpu"]
            print(f"profile: step {self.step}: {out} (GPU idle {gpu.get('gpu_idle_share', 0):.0%} of "
                  f"{gpu.get('gpu_span_s', 0):.3f} s; {self._traced} micro-batches, "
                  f"{self.summary['micro_batch_s']:.3f} s each; "
                  f"optimizer step {self.summary['optimizer_step_s']:.3f} s)",
                  flush=True)
