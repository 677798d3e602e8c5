"""Routed experts' compute weights kept in host memory and paged onto the device per active expert
(``model.offload.placement.resident_weights: no``).

Layout. ``host[layer]`` is an (E, P) tensor of the compute dtype (pinned when the device is a GPU): row
``e`` is expert ``e``'s ``gate_proj | up_proj | down_proj`` weights flattened, the order of its expert
record, so P = 3 * I * H. The device holds ``num_buffers`` working buffers of shape (E, P), whatever the
number of layers; a buffer holds one layer's rows at a time, and only the rows that were asked for (the
experts that got tokens). The model's expert parameters keep their names, shapes and ``.grad`` but
point at a one-element placeholder: their values live here.

One layer ``l`` on CUDA::

    forward    active experts of l read on the host (the layer's one read of its counts)
               fetch(l, active):  copy stream waits for the buffer's last reader and for host writes of
                                  l, H2D of the rows not already there, event ready[b]; the compute
                                  stream waits on ready[b] only
               experts run; release(l): event freed[b] on the compute stream
               prefetch(l + 1, experts it routed last time): the other buffer, under l's compute
    backward   fetch(l, active) again (a hit while the buffer still holds l), prefetch(l - 1, its exact
               forward set) under l's backward
    step       write(layer, expert, weights): host row replaced (D2H on the compute stream for the GPU step
               path, a host copy for the CPU path); the row leaves any buffer holding it

On a CPU stand-in device streams and events collapse and copies are plain copies; the bookkeeping (which
rows a buffer holds, what a write invalidates) is the same, which is what CI checks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from moetrain.offload.paged_experts import run_paged
from moetrain.offload.streams import event, on, side_stream


@dataclass
class PagerStats:
    """Counters of the weight pager since the last :meth:`ExpertWeightPager.reset_stats`."""

    h2d_bytes: int = 0
    d2h_bytes: int = 0
    row_hits: int = 0
    row_misses: int = 0
    prefetched_rows: int = 0


@dataclass
class _Buffer:
    data: torch.Tensor  # (E, P) on the device
    layer: Optional[int] = None
    rows: set[int] = field(default_factory=set)  # experts of `layer` whose rows are current here
    ready: Optional[torch.cuda.Event] = None  # recorded on the copy stream after the last copy into it
    freed: Optional[torch.cuda.Event] = None  # recorded on the compute stream after its last reader
    used: int = 0  # fetch clock of the last fetch/prefetch (least recently used is reused first)


class ExpertWeightPager:
    """The routed experts' compute weights of every MoE layer, in host memory, paged per active expert.

    Args:
        blocks: the model's MoE blocks (``layer_idx`` and ``experts``, a
            :class:`~moetrain.models.experts.RoutedExperts`); every layer must have the same expert shape.
        device: the compute device.
        dtype: the compute dtype of the weights (the store keeps the fp32 master).
        num_buffers: device working buffers (at least 2, so that one fills while the other computes).
    """

    def __init__(self, blocks: Iterable[nn.Module], device: torch.device, dtype: torch.dtype,
                 num_buffers: int = 2) -> None:
        blocks = list(blocks)
        if num_buffers < 2:
            raise ValueError(f"ExpertWeightPager needs at least 2 buffers, got {num_buffers}")
        self.device, self.dtype = device, dtype
        cuda = device.type == "cuda"
        first = blocks[0].experts
        self.num_experts = first.num_experts
        self.hidden, self.width = first.hidden_size, first.intermediate_size
        self.row_numel = 3 * self.hidden * self.width
        self.row_bytes = self.row_numel * torch.empty((), dtype=dtype).element_size()
        self.host: dict[int, torch.Tensor] = {}
        self._placeholder = torch.zeros((), dtype=dtype, device=device)
        with torch.no_grad():
            for block in blocks:
                experts = block.experts
                if (experts.num_experts, experts.hidden_size, experts.intermediate_size) != \
                        (self.num_experts, self.hidden, self.width):
                    raise ValueError(f"layer {block.layer_idx}: resident_weights=no needs every MoE layer to have the "
                                     f"same expert shape ({self.num_experts} experts of {self.hidden}x{self.width})")
                host = torch.empty((self.num_experts, self.row_numel), dtype=dtype, pin_memory=cuda)
                for e, expert in enumerate(experts):
                    start = 0
                    for p in (expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight):
                        host[e, start:start + p.numel()].copy_(p.detach().reshape(-1))
                        start += p.numel()
                        p.data = self._placeholder.expand(p.shape)  # values live in host[layer] now
                self.host[block.layer_idx] = host
        self.buffers = [_Buffer(torch.empty((self.num_experts, self.row_numel), dtype=dtype, device=device),
                                ready=event(device), freed=event(device)) for _ in range(num_buffers)]
        self.layers = sorted(self.host)  # MoE layers in order (the neighbours prefetch walks to)
        self.copy_stream = side_stream(device)
        self.written = {layer: event(device) for layer in self.host}  # host rows of a layer last written (D2H)
        self.copied = {layer: event(device) for layer in self.host}  # last H2D that read a layer's host rows
        self.last_routed: dict[int, list[int]] = {}  # experts each layer routed in its last forward
        self.stats = PagerStats()
        self._clock = 0
        self._current: Optional[_Buffer] = None  # the buffer compute reads now (never reused by a prefetch)
        self._lock = threading.Lock()  # the CPU step path writes rows from its own thread

    # ------------------------------------------------------------------ sizes
    @property
    def device_bytes(self) -> int:
        """Device memory of the working buffers (independent of the number of layers)."""
        return sum(b.data.numel() * b.data.element_size() for b in self.buffers)

    @property
    def host_bytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.host.values())

    def reset_stats(self) -> PagerStats:
        stats, self.stats = self.stats, PagerStats()
        return stats

    # ------------------------------------------------------------------ paging
    def _buffer_for(self, layer: int, for_compute: bool) -> _Buffer:
        for buf in self.buffers:
            if buf.layer == layer:
                return buf
        candidates = [b for b in self.buffers if b is not self._current or for_compute]
        buf = min(candidates, key=lambda b: b.used)
        buf.layer, buf.rows = layer, set()
        return buf

    def _load(self, layer: int, experts: Iterable[int], for_compute: bool) -> _Buffer:
        with self._lock:
            buf = self._buffer_for(layer, for_compute)
            self._clock += 1
            buf.used = self._clock
            missing = [e for e in experts if e not in buf.rows]
            if for_compute:
                self.stats.row_hits += sum(1 for e in experts if e in buf.rows)
                self.stats.row_misses += len(missing)
            else:
                self.stats.prefetched_rows += len(missing)
            if missing:
                host = self.host[layer]
                stream = self.copy_stream
                with on(stream):
                    if stream is not None:
                        stream.wait_event(buf.freed)  # its last reader (forward or backward GEMMs) is done
                        stream.wait_event(self.written[layer])  # new weights of a step have landed in host
                    for first, last in _runs(sorted(missing)):  # consecutive experts: one copy
                        buf.data[first:last + 1].copy_(host[first:last + 1], non_blocking=True)
                    if stream is not None:
                        buf.ready.record(stream)
                        self.copied[layer].record(stream)
                buf.rows.update(missing)
                self.stats.h2d_bytes += len(missing) * self.row_bytes
            return buf

    def fetch(self, layer: int, experts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Device weights of ``layer`` with the rows of ``experts`` current, ready for the current stream.

        Returns (E, I, H) gate, (E, I, H) up and (E, H, I) down views of a working buffer; rows of other
        experts hold stale values (the grouped GEMM never reads an expert that got no rows). Call
        :meth:`release` once the kernels reading them are queued.
        """
        buf = self._load(layer, experts, for_compute=True)
        self._current = buf
        if buf.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(buf.ready)
        ih = self.width * self.hidden
        data = buf.data
        return (data[:, :ih].view(-1, self.width, self.hidden), data[:, ih:2 * ih].view(-1, self.width, self.hidden),
                data[:, 2 * ih:].view(-1, self.hidden, self.width))

    def release(self, layer: int) -> None:
        """The kernels reading ``layer``'s buffer are queued: it may be refilled once they have run."""
        for buf in self.buffers:
            if buf.layer == layer and buf.freed is not None:
                buf.freed.record(torch.cuda.current_stream(self.device))
        self._current = None

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start copying ``layer``'s rows of ``experts`` into a buffer that compute is not reading."""
        if layer in self.host and experts:
            self._load(layer, experts, for_compute=False)

    def run(self, layer: int, x_sorted: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor,
            params: list[nn.Parameter], *, grouped: bool, recomputing: bool) -> torch.Tensor:
        """The :class:`~moetrain.models.seam.ExpertWeights` entry: ``layer``'s experts over their sorted rows
        with weights paged from here (see :func:`~moetrain.offload.paged_experts.run_paged`)."""
        return run_paged(self, layer, x_sorted, counts, offsets, params, grouped=grouped, recomputing=recomputing)

    def routed(self, layer: int, experts: list[int]) -> None:
        """Remember the experts ``layer`` routed to in this forward (the next forward's prefetch guess)."""
        self.last_routed[layer] = experts

    def next_layer(self, layer: int, step: int) -> Optional[int]:
        """The MoE layer ``step`` positions after ``layer`` in layer order (None past either end)."""
        i = self.layers.index(layer) + step
        return self.layers[i] if 0 <= i < len(self.layers) else None

    # ------------------------------------------------------------------ writes
    def _drop(self, layer: int, expert: int) -> None:
        for buf in self.buffers:
            if buf.layer == layer:
                buf.rows.discard(expert)

    @torch.no_grad()
    def write(self, layer: int, expert: int, weights: torch.Tensor, *, start: int = 0) -> None:
        """Replace expert ``expert`` of ``layer``'s weights from element ``start`` on by ``weights`` (flat, in
        record order: (P,) for the whole row, or one parameter's part; any dtype, on the device or in host
        memory). From the device the copy is queued on the current stream (no host sync); the next page-in
        of the layer waits for it."""
        with self._lock:
            row = self.host[layer][expert, start:start + weights.numel()]
            if weights.device.type == "cuda":
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(self.copied[layer])  # no page-in still reading the old row
                row.copy_(weights.reshape(-1).to(self.dtype), non_blocking=True)
                self.written[layer].record(stream)
                self.stats.d2h_bytes += row.numel() * row.element_size()
            else:
                if self.copied[layer] is not None:
                    self.copied[layer].synchronize()
                row.copy_(weights.reshape(-1))
            self._drop(layer, expert)

    def weights(self, layer: int, expert: int) -> torch.Tensor:
        """Expert ``expert`` of ``layer``'s current weights, (P,) in host memory (waits for pending writes)."""
        if self.written[layer] is not None:
            self.written[layer].synchronize()
        return self.host[layer][expert]


def _runs(sorted_ids: list[int]) -> list[tuple[int, int]]:
    """[(first, last)] of the maximal runs of consecutive integers in ``sorted_ids``."""
    runs: list[tuple[int, int]] = []
    for i in sorted_ids:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs
