"""Device slots for expert state, and the streams, events and host buffers that fill and drain them.

A bounded pool of ``num_slots`` device slots (each one record's flat ``[master | exp_avg | exp_avg_sq]``) is the only
device memory the engine adds; its size comes from ``gpu_budget_gb`` and does not grow with the number of experts. A
slot keeps its record after the step (write-through), so an expert that is stepped again soon is a cache hit; when a
slot is needed, the record with the lowest routing frequency that is not in use or reserved by a prefetch is evicted.

Streams and events (CUDA; on the CPU every stream is the current one and events are no-ops, so the same bookkeeping
runs in CI)::

    compute  ──fwd L0..Ln──bwd Ln........................L0──| step Ln | step Ln-1 | ... | fwd L0 ...
    page-in      (trace known async) ─ H2D Ln ─ H2D Ln-1 ─ ... (slot ready: its in_event)
    page-out                                                   ─ D2H Ln ─ D2H Ln-1 ─ ... (its out_event)
    NVMe         aio reads into the slot's staging ahead of H2D;  aio writes from it after D2H

Each slot is a :class:`Slot` (its record, state, events, staging buffer); the regular pool's come first in ``slots``.

* page-in: ``copy_(non_blocking=True)`` from pinned host memory on ``in_stream``, one event per slot; the compute
  stream waits on that event only (``wait_event``: no host sync) right before the expert's fused step.
* page-out: after the step, ``out_stream`` waits on an event recorded on the compute stream, copies the slot back,
  and records the slot's ``out_event``; the slot is reused only after the in-stream waits on it.
* NVMe: reads into a pinned, aligned staging buffer paired with the slot, then H2D; write-back is D2H into that
  staging buffer, then an aio write issued when the D2H event has completed (the host waits on that event only when
  it drains writes, at the end of the step, off the compute path).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch

from moetrain.offload.master_segment import copy_masters
from moetrain.offload.nvme import aligned_empty
from moetrain.offload.slots import Slot, SlotState, TransferStats, pick_hot
from moetrain.offload.store import ExpertRecord, ExpertStore, Tier
from moetrain.offload.streams import event, on, side_stream
from moetrain.offload.weight_masters import paged_from


class Swapper:
    """Bounded device slots for expert state, filled on ``in_stream`` and drained on ``out_stream``.

    Args:
        store: the expert records and their host/NVMe tiers.
        device: the compute device (``cpu`` stands in for a GPU in tests).
        num_slots: slots of ``store.max_padded`` floats each.
        masters_from_weights: the compute weights hold the records' master segment (``bf16_sr`` or ``fp32_split``,
            resident weights): host-tier records page what follows it only (:mod:`moetrain.offload.weight_masters`).
    """

    def __init__(self, store: ExpertStore, device: torch.device, num_slots: int, *,
                 masters_from_weights: bool = False) -> None:
        self.store = store
        self.masters_from_weights = masters_from_weights
        self.stale_masters: dict[tuple[int, int], ExpertRecord] = {}  # host master older than the weights
        self.weight_masters = False  # the step reads the master from the weights: slots' master segments are unused
        self.device = device
        self.num_slots = num_slots
        self.slot_numel = store.max_padded
        self.pool = torch.zeros(num_slots, self.slot_numel, dtype=torch.float32, device=device)  # regular slots
        self.hot_pool: Optional[torch.Tensor] = None  # (hot_capacity, slot_numel): the hot-expert cache's slots
        self.hot_capacity = 0
        self.hot: set[tuple[int, int]] = set()  # records kept resident (written back only when they cool)
        self._not_hot: Optional[list[int]] = None  # slots holding no hot record, in order (None: to be listed again)
        self.in_stream = side_stream(device)
        self.out_stream = side_stream(device)
        self.has_nvme = any(r.tier is Tier.NVME for r in store)
        self.slots: list[Slot] = [self._new_slot(row, hot=False) for row in self.pool]
        self.slot_of: dict[tuple[int, int], int] = {}
        self.pending_writes: list[tuple[Optional[torch.cuda.Event], int, ExpertRecord]] = []
        # slot whose page-out last wrote a CPU-tier record: its next page-in (any slot) waits for that write to land
        self.written_from: dict[tuple[int, int], int] = {}
        self.inflight_writes: set[tuple[tuple[int, int], int]] = set()  # (record, slot) written, not waited for
        self.stats = TransferStats()
        self.batches = 0  # write-back batches so far: a page-in takes the latest one's slots last (still leaving)
        self.changes, self.full_at = 0, -1  # changes that may free a slot; the count when a prefetch found none

    def _new_slot(self, data: torch.Tensor, hot: bool) -> Slot:
        staging = aligned_empty(self.slot_numel, self.store.pin) if self.has_nvme else None
        return Slot(data, hot=hot, in_event=event(self.device), out_event=event(self.device), staging=staging)

    @property
    def device_bytes(self) -> int:
        """Device memory held by the slots (the hot-expert cache's included)."""
        hot = 0 if self.hot_pool is None else self.hot_pool.numel() * self.hot_pool.element_size()
        return self.pool.numel() * self.pool.element_size() + hot

    @property
    def total_slots(self) -> int:
        return len(self.slots)

    # ------------------------------------------------------------------ hot-expert cache
    def grow_hot_cache(self, capacity: int) -> None:
        """Add ``capacity`` slots that keep the hottest records' state resident between steps (once).

        Under :meth:`use_weight_masters` the slots are compact: each holds what follows the master segment only
        (``slot_numel - skip`` floats, :meth:`hot_slot_bytes`), and its full-size view begins ``skip`` floats
        earlier, over the previous slot's tail (the first slot's over ``skip`` floats of padding). Nothing reads
        or writes a slot's first ``skip`` floats then: page-ins and page-outs start after the master and the step
        reads the master from the weights."""
        self._changed()
        if capacity <= 0 or self.hot_pool is not None:
            return
        skip = self.master_floats() if self.weight_masters else 0
        stride = self.slot_numel - skip
        self.hot_pool = torch.zeros(skip + capacity * stride, dtype=torch.float32, device=self.device)
        self.hot_capacity = capacity
        self.slots += [self._new_slot(self.hot_pool[k * stride:k * stride + self.slot_numel], hot=True)
                       for k in range(capacity)]
        self._not_hot = None

    def master_floats(self) -> int:
        """Floats of master segment that every record's page-in and page-out skip (masters from the weights)."""
        return min((paged_from(r) for r in self.store), default=0) if self.masters_from_weights else 0

    def hot_slot_bytes(self) -> int:
        """Device bytes a hot-cache slot takes when grown now."""
        return (self.slot_numel - (self.master_floats() if self.weight_masters else 0)) * 4

    def use_weight_masters(self) -> None:
        """From now on the step reads and writes the records' master in the compute weights
        (:func:`~moetrain.offload.fused_step.fused_step_many_`'s ``weight_masters``): page-ins leave the slot's
        master segment unfilled and page-outs never copy it (a host master is stale until a flush or settle writes
        the weights there), so hot-cache slots grown later hold none. Needs masters in the weights, no NVMe records."""
        assert self.masters_from_weights and not self.has_nvme
        self.weight_masters = True
        for slot in self.slots:
            slot.master_pending = False

    def revise_hot(self) -> None:
        """Re-pick the hot set: the ``hot_capacity`` records with the highest routing frequency, the hot ones with a
        margin (:func:`~moetrain.offload.slots.pick_hot`; end of a step). Records that cool down are written back
        now and become ordinary cache entries."""
        self._changed()
        if not self.hot_capacity:
            return
        new = pick_hot({r.key: r.frequency for r in self.store}, self.hot, self.hot_capacity)
        cooled = [self.store.records[k] for k in self.hot - new if k in self.slot_of]
        self.hot = new
        self._not_hot = None
        self._write_back([r for r in cooled if self.slots[self.slot_of[r.key]].dirty])

    def reset_stats(self) -> TransferStats:
        done, self.stats = self.stats, TransferStats()
        return done

    def mark_transfer(self, stream: Optional[torch.cuda.Stream]) -> None:
        """Call on ``stream`` right before a copy is queued: the first call of a step opens the paging window."""
        if stream is not None and self.stats.window_start is None:
            self.stats.window_start = torch.cuda.Event(enable_timing=True)
            self.stats.window_start.record(stream)

    def transfer_streams(self) -> list[torch.cuda.Stream]:
        return [s for s in (self.in_stream, self.out_stream) if s is not None]

    # ------------------------------------------------------------------ slot choice
    def _victims(self, protect: set[int]) -> list[int]:
        """The slots a page-in may take, in the order it takes them: empty slots, then evictable ones by the routing
        frequency of their record (lowest first; ties by slot index), those of the latest write-back batch last (a
        page-in into one waits for its page-out). One scan serves a whole call of :meth:`_page_in`: its own choices
        change nothing else of the order (they join ``protect``). The scan skips the slots of hot records (the hot
        cache stays) without visiting them: a step calls this some 200 times, and visiting a thousand slots each
        time was 50-90 ms of the host's time a step at DeepSeek-MoE-16B's size (run r32's profile)."""
        if self._not_hot is None:
            self._not_hot = [s for s, slot in enumerate(self.slots) if slot.key is None or slot.key not in self.hot]
        empty, used = [], []
        for s in self._not_hot:
            slot = self.slots[s]
            if s in protect or slot.reserved or slot.state in (SlotState.IN_USE, SlotState.READING):
                continue
            if slot.key is None:
                empty.append(s)
            elif slot.key not in self.hot and not slot.dirty:  # a dirty slot is written first
                used.append((slot.written == self.batches, self.store.records[slot.key].frequency, s))
        return empty + [s for *_, s in sorted(used)]

    def _assign(self, rec: ExpertRecord, s: int) -> None:
        old = self.slots[s].key
        if old is not None:
            del self.slot_of[old]
        self.slots[s].key = rec.key
        self.slot_of[rec.key] = s
        if rec.key in self.hot:  # the slot now holds a hot record (the old one was evictable: not hot)
            self._not_hot = None

    # ------------------------------------------------------------------ page-in
    def _page_in(self, recs: list[ExpertRecord], protect: set[int], reserve: bool) -> list[ExpertRecord]:
        """Issue page-ins for ``recs`` (not present); returns those that got a slot."""
        placed: list[tuple[ExpertRecord, int]] = []
        order = iter(self._victims(protect)) if recs else iter(())
        for rec in recs:
            s = next(order, None)
            if s is None and not reserve:
                self.unreserve()  # a prefetch is a hint: a record needed now may take its slot
                order = iter(self._victims(protect))
                s = next(order, None)
            if s is None:
                break
            self._assign(rec, s)
            protect.add(s)
            self.slots[s].reserved = reserve
            placed.append((rec, s))
        disk = [(r, s) for r, s in placed if r.tier is Tier.NVME]
        writing = {rec.key for _, _, rec in self.pending_writes} | {k for k, _ in self.inflight_writes}
        busy = {s for _, s, _ in self.pending_writes} | {s for _, s in self.inflight_writes}
        if any(r.key in writing or s in busy for r, s in disk):
            # a record being written back must land before it is read again, and a staging buffer
            # must be written out before it is refilled
            self.drain_writes(wait=True)
        for rec, s in disk:
            slot = self.slots[s]
            if slot.in_event is not None:
                slot.in_event.synchronize()  # the staging buffer's last H2D has left (copy engine only)
            self.store.swap.submit_read(slot.staging[:rec.padded], rec.offset)
            slot.state = SlotState.READING
        self._h2d([(rec, s, None) for rec, s in placed if rec.tier is Tier.CPU])
        return [r for r, _ in placed]

    def _h2d(self, copies: list[tuple[ExpertRecord, int, Optional[torch.Tensor]]]) -> None:
        """Queue (record, slot, host source) page-ins on ``in_stream`` (one stream switch for all of them); a
        source of None: the record's host slab."""
        if not copies:
            return
        with on(self.in_stream):
            for rec, s, src in copies:
                slot = self.slots[s]
                if self.in_stream is not None:
                    self.in_stream.wait_event(slot.out_event)  # the slot's previous page-out has left
                    source = self.written_from.get(rec.key)
                    if source is not None and source != s:
                        self.in_stream.wait_event(self.slots[source].out_event)  # the record's write-back landed
                    self.mark_transfer(self.in_stream)
                start = self._paged_start(rec)
                tail = self.store.host_tail(rec, start) if src is None else src[start:]
                slot.view(rec.padded)[start:].copy_(tail, non_blocking=True)
                if slot.in_event is not None:
                    slot.in_event.record(self.in_stream)
                slot.state = SlotState.READY
                slot.master_pending = start > 0 and not self.weight_masters
                self.stats.h2d_bytes += (rec.padded - start) * 4

    def _paged_start(self, rec: ExpertRecord) -> int:
        """Where a host-tier record's page-in and page-out begin: after its master when the weights hold it, else 0."""
        return paged_from(rec) if self.masters_from_weights and rec.tier is Tier.CPU else 0

    def _finish_disk_reads(self) -> None:
        """Wait for outstanding NVMe reads and push their staging buffers to the device."""
        self._changed()
        if not self.has_nvme:
            return  # no slot is ever READING: no scan of every slot (twice a chunk)
        reading = [s for s, slot in enumerate(self.slots) if slot.state is SlotState.READING]
        if not reading:
            return
        t0 = time.perf_counter()
        self.store.swap.wait_reads()
        self.stats.stall_s += time.perf_counter() - t0
        copies = []
        for s in reading:
            rec = self.store.records[self.slots[s].key]
            copies.append((rec, s, self.slots[s].staging[:rec.padded]))
        self._h2d(copies)

    def prefetch(self, recs: list[ExpertRecord]) -> int:
        """Start page-ins of ``recs`` that are absent, as far as free or evictable slots allow (no wait)."""
        missing = [r for r in recs if r.key not in self.slot_of]
        protect = {self.slot_of[r.key] for r in recs if r.key in self.slot_of}
        for s in protect:
            self.slots[s].reserved = True
        placed = self._page_in(missing, protect, reserve=True) if self.can_prefetch() else []
        if len(placed) < len(missing):
            self.full_at = self.changes  # no slot is left to a prefetch until one is released, unreserved, ...
        self.stats.prefetched += len(placed)
        return len(placed)

    def can_prefetch(self) -> bool:
        """False while a prefetch would find no slot: one found none and nothing has changed since that may free
        one (every change counts, see :meth:`_changed`). Backward asks this each layer of each micro-batch, and the
        scan of every slot it saves (hot cache included) was host time in the middle of backward."""
        return self.full_at != self.changes

    def _changed(self) -> None:
        self.changes += 1

    def acquire(self, recs: list[ExpertRecord]) -> list[torch.Tensor]:
        """Make ``recs`` (at most ``num_slots``) present; the current stream waits for their arrival. Returns one
        (padded,) device view per record: its flat ``[master | exp_avg | exp_avg_sq]``."""
        assert len(recs) <= self.num_slots, "acquire at most num_slots records at once"
        self._finish_disk_reads()  # prefetched reads become ordinary (evictable) entries
        protect = set()
        missing = []
        for rec in recs:
            s = self.slot_of.get(rec.key)
            if s is None:
                missing.append(rec)
                self.stats.misses += 1
            else:
                protect.add(s)
                self.stats.hits += 1
        placed = self._page_in(missing, protect, reserve=False)
        assert len(placed) == len(missing), "no evictable slot: release slots before acquiring more"
        self._finish_disk_reads()
        views, pending = [], []
        for rec in recs:
            slot = self.slots[self.slot_of[rec.key]]
            slot.reserved = False
            slot.state = SlotState.IN_USE
            if slot.in_event is not None:
                torch.cuda.current_stream(self.device).wait_event(slot.in_event)
            views.append(slot.view(rec.padded))
            if slot.master_pending:
                pending.append((rec, views[-1]))
                slot.master_pending = False
        if pending:  # after the waits: the slot's previous page-out (its master included) has left
            copy_masters([r for r, _ in pending], [v for _, v in pending])
        return views

    # ------------------------------------------------------------------ page-out
    def release(self, recs: list[ExpertRecord], dirty: bool = True) -> None:
        """Done stepping ``recs``: write their slots back (lazily, on ``out_stream``) and keep them cached.
        Records of the hot set are not written back: their slot stays the current copy (dirty) until
        they cool down or :meth:`flush` is called."""
        self._changed()
        for rec in recs:
            self.slots[self.slot_of[rec.key]].state = SlotState.READY
        if not dirty:
            return
        for rec in recs:
            if rec.key in self.hot:
                self.slots[self.slot_of[rec.key]].dirty = True
        self._write_back([r for r in recs if r.key not in self.hot], skip_masters=True)

    def _write_back(self, recs: list[ExpertRecord], skip_masters: bool = False) -> None:
        """Page ``recs``' slots out to their tier on ``out_stream`` after the compute stream's work so far;
        ``skip_masters``: host-tier records leave their master segment in the compute weights (stale on the host)."""
        self._changed()
        if not recs:
            return
        self.batches += 1
        with self._out_after_compute():
            self.mark_transfer(self.out_stream)
            for rec in recs:
                s = self.slot_of[rec.key]
                slot = self.slots[s]
                slot.dirty, slot.written = False, self.batches
                src = slot.view(rec.padded)
                start = self._paged_start(rec) if skip_masters or self.weight_masters or rec.host_skip else 0
                if rec.tier is Tier.CPU:
                    self.store.host_tail(rec, start).copy_(src[start:], non_blocking=True)
                    self.written_from[rec.key] = s
                else:
                    slot.staging[:rec.padded].copy_(src, non_blocking=True)
                if slot.out_event is not None:
                    slot.out_event.record(self.out_stream)
                if start and not rec.host_skip:  # (a record without a host master has none to be stale)
                    self.stale_masters[rec.key] = rec
                else:
                    self.stale_masters.pop(rec.key, None)
                self.stats.d2h_bytes += (rec.padded - start) * 4
                if rec.tier is Tier.NVME:
                    self.pending_writes.append((slot.out_event, s, rec))

    @contextmanager
    def _out_after_compute(self) -> Iterator[None]:
        """Queue the ``with`` body on ``out_stream``, after the work queued on the compute stream so far."""
        done = event(self.device)
        if done is not None:
            done.record(torch.cuda.current_stream(self.device))
        with on(self.out_stream):
            if done is not None:
                self.out_stream.wait_event(done)
            yield

    def drain_writes(self, wait: bool = False) -> None:
        """Issue the NVMe writes whose D2H copies are done; with ``wait``, block until they are on disk."""
        if not self.pending_writes and not wait:
            return
        t0 = time.perf_counter()
        for done, s, rec in self.pending_writes:
            if done is not None:
                done.synchronize()
            self.store.swap.submit_write(self.slots[s].staging[:rec.padded], rec.offset)
            self.inflight_writes.add((rec.key, s))
        self.pending_writes.clear()
        if wait and self.store.swap is not None:
            self.store.swap.wait_writes()
            self.inflight_writes.clear()
        self.stats.stall_s += time.perf_counter() - t0

    def flush(self) -> None:
        """Every page-out has reached its tier (host memory or disk): the store is authoritative. Dirty
        hot-cache slots are written back first (they stay cached, now clean)."""
        self._write_back([self.store.records[slot.key] for slot in self.slots if slot.dirty])
        self._write_masters(list(self.stale_masters.values()))
        if self.out_stream is not None:
            self.out_stream.synchronize()
        self.drain_writes(wait=True)

    def _write_masters(self, recs: list[ExpertRecord]) -> Optional[torch.cuda.Event]:
        """Queue the compute weights of ``recs`` (stale host masters) into their host masters on ``out_stream``
        after the compute stream's work so far; returns the event that marks them landed (None on the CPU)."""
        if not recs:
            return None
        with self._out_after_compute():  # the weights' last writer: the compute stream
            copy_masters(recs, [self.store.host_view(r) for r in recs], non_blocking=self.out_stream is not None)
            landed = event(self.device)
            if landed is not None:
                landed.record(self.out_stream)
        for rec in recs:
            del self.stale_masters[rec.key]
            self.stats.d2h_bytes += rec.numel * rec.layout.offsets["master"][2].itemsize
        return landed

    def unreserve(self) -> None:
        """Drop every prefetch reservation (end of step: unused prefetches become ordinary cache entries)."""
        self._changed()
        for slot in self.slots:
            slot.reserved = False

    def settle(self, recs: list[ExpertRecord]) -> None:
        """The tier of ``recs`` is current and no slot keeps a copy (before the CPU path steps them in their tier).
        Host-tier records wait only for their own last page-out, not for every one."""
        self._write_back([r for r in recs if r.key in self.slot_of and self.slots[self.slot_of[r.key]].dirty])
        landed = self._write_masters([r for r in recs if r.key in self.stale_masters])
        if landed is not None:
            landed.synchronize()
        if any(r.tier is Tier.NVME for r in recs):
            self.flush()
        else:
            for s in {self.written_from[r.key] for r in recs if r.key in self.written_from}:
                if self.slots[s].out_event is not None:
                    self.slots[s].out_event.synchronize()
        for rec in recs:
            self.invalidate(rec)

    def invalidate(self, rec: ExpertRecord) -> None:
        """Forget a cached copy (the tier was written directly, e.g. by a state load or the CPU path)."""
        self._changed()
        s = self.slot_of.pop(rec.key, None)
        if s is not None:
            if rec.key in self.hot:
                self._not_hot = None
            slot = self.slots[s]
            assert not slot.dirty, f"{rec.prefix}: dropping a slot that was not written back"
            slot.key = None
            slot.state = SlotState.EMPTY
            slot.reserved = False
