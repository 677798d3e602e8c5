"""The expert engine's figures of one optimizer step, as the training loop writes them to ``metrics.jsonl``.

Counters are read from the parts (swapper, weight pager, look-ahead, swap file) at the end of the step. Times
on CUDA come from events: an event before the step's first launch and one at the end of every stream the step
queued work on, resolved only when :meth:`StepTelemetry.read` is called (it waits for the step's work; never
on the training path). On a CPU device the host's time stands in.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from moetrain.offload.streams import recorded


class StepTelemetry:
    """Collects one step's figures from the engine's parts.

    Args:
        store: the expert store (its layers, and its swap file's byte counters).
        swapper: the device slots (transfer counters, streams, hot cache).
        rates: the link and CPU-Adam rates in use.
        pager: paged compute weights, or None.
        lookahead: the look-ahead accounting, or None.
        cpu_streams: the CPU step path's copy streams (empty without it, or on a CPU device).
    """

    def __init__(self, store, swapper, rates, *, pager=None, lookahead=None, cpu_streams=()) -> None:
        self.store, self.swapper, self.rates = store, swapper, rates
        self.pager, self.lookahead, self.cpu_streams = pager, lookahead, list(cpu_streams)
        self.figures: dict[str, float] = {}
        self._timing: Optional[tuple] = None  # (step start, paging window start, end events) of the last step
        self._nvme_mark = self._nvme_bytes()  # swap-file byte counters at the end of the last step
        self._start: Optional[tuple[float, Optional[torch.cuda.Event]]] = None

    def _nvme_bytes(self) -> tuple[int, int]:
        """Bytes read/written on the swap file so far (all channels)."""
        swap = self.store.swap
        return (0, 0) if swap is None else (swap.bytes_read, swap.bytes_written)

    def start(self, device: torch.device) -> None:
        """The step begins (host clock, and an event on the current stream on CUDA)."""
        self._start = (time.perf_counter(), recorded(device, timing=True))

    def record(self, counts: torch.Tensor, *, on_gpu: int, on_cpu: int, early_layers: int) -> None:
        """The step ended: ``counts`` (M, E) host routed tokens per layer and expert; experts stepped on each
        path; layers stepped under backward."""
        t0, start = self._start
        seconds = time.perf_counter() - t0
        st = self.swapper.stats
        nvme0, nvme1 = self._nvme_mark, self._nvme_bytes()
        self._nvme_mark = nvme1
        t: dict[str, float] = {
            "offload/h2d_bytes": float(st.h2d_bytes), "offload/d2h_bytes": float(st.d2h_bytes),
            "offload/nvme_read_bytes": float(nvme1[0] - nvme0[0]),
            "offload/nvme_write_bytes": float(nvme1[1] - nvme0[1]),
            "offload/step_s": seconds, "offload/step_host_s": seconds, "offload/page_window_s": seconds,
            "offload/stall_s": st.stall_s,
            "offload/cache_hit_rate": st.hits / (st.hits + st.misses) if st.hits + st.misses else 0.0,
            "offload/prefetched": float(st.prefetched),
            "offload/experts_stepped_gpu": float(on_gpu), "offload/experts_stepped_cpu": float(on_cpu),
            "offload/gpu_state_bytes": float(self.swapper.device_bytes),
            "offload/hot_experts": float(len(self.swapper.hot)),
            "offload/hot_cache_slots": float(self.swapper.hot_capacity),
            "offload/rate_h2d_gbps": self.rates.h2d_gbps, "offload/rate_d2h_gbps": self.rates.d2h_gbps,
            "offload/rate_duplex_gbps": self.rates.duplex_gbps,
            "offload/rate_cpu_adam_gparams": self.rates.cpu_adam_gparams,
        }
        if self.pager is not None:  # paged compute weights: their own traffic, forward and backward included
            ps = self.pager.reset_stats()
            rows = ps.row_hits + ps.row_misses
            t.update({"offload/weights_h2d_bytes": float(ps.h2d_bytes),
                      "offload/weights_d2h_bytes": float(ps.d2h_bytes),
                      "offload/weights_hit_rate": ps.row_hits / rows if rows else 0.0,
                      "offload/weights_prefetched_rows": float(ps.prefetched_rows),
                      "offload/weights_device_bytes": float(self.pager.device_bytes)})
        if self.lookahead is not None:
            t["offload/lookahead_precision"], t["offload/lookahead_recall"] = self.lookahead.read()
        active = counts > 0
        for i, layer in enumerate(self.store.layers):
            t[f"offload/active_experts/layer{layer}"] = float(active[i].sum())
        used = counts[active].float()
        t["offload/tokens_per_expert_mean"] = float(used.mean()) if used.numel() else 0.0
        t["offload/tokens_per_expert_max"] = float(used.max()) if used.numel() else 0.0
        t["offload/layers_stepped_in_backward"] = float(early_layers)
        self.figures = t
        self._timing = None
        if start is not None:  # end marks on every stream the step queued work on; read lazily
            device = self.swapper.device
            streams = [torch.cuda.current_stream(device), *self.swapper.transfer_streams(), *self.cpu_streams]
            ends = []
            for stream in streams:
                ends.append(torch.cuda.Event(enable_timing=True))
                ends[-1].record(stream)
            self._timing = (start, st.window_start, ends)

    def _resolve_timing(self) -> None:
        """Replace host-time figures by CUDA-event ones (waits for the step's last events)."""
        t = self.figures
        if self._timing is None:
            if t:
                t["offload/link_gbps"] = ((t["offload/h2d_bytes"] + t["offload/d2h_bytes"]) / t["offload/page_window_s"]
                                          / 1e9 if t["offload/page_window_s"] > 0 else 0.0)
            return
        start, window_start, ends = self._timing
        self._timing = None
        for e in ends:
            e.synchronize()
        t["offload/step_s"] = max(start.elapsed_time(e) for e in ends) / 1e3
        window = max(window_start.elapsed_time(e) for e in ends) / 1e3 if window_start is not None else 0.0
        t["offload/page_window_s"] = window
        moved = t["offload/h2d_bytes"] + t["offload/d2h_bytes"]
        t["offload/link_gbps"] = moved / window / 1e9 if window > 0 else 0.0

    def read(self) -> dict[str, float]:
        """Figures of the last step (flat). ``step_s``: from the start of the step to the end of the last work it
        queued on any stream; ``step_host_s``: the host's time issuing it (close to ``step_s``: the host sets the
        pace); ``page_window_s``: from the first transfer of the step (backward prefetch included)
        to the end of the last; ``link_gbps``: (h2d + d2h bytes) / ``page_window_s``."""
        self._resolve_timing()
        return dict(self.figures)
