"""The device-side expert cache: a fixed set of expert slots, a replacement policy, a copy stream.

The device holds ``main`` slots managed by the policy (LRU or LFU, :mod:`moetrain.inference.policy`) and a few
``staging`` slots (a ring) for experts the policy does not admit (LFU: routed less often than every cached expert).
A slot is one expert row of the :class:`~moetrain.inference.store.HostExpertStore` (its
weights, and its scales when int8). Hits and misses are counted per demanded (layer, expert) of a forward
call; the demand order is kept as the routing trace from which :func:`ideal_static_hit_rate` computes what
the best fixed set of experts of the same number of slots would have hit.

A layer that routes to more experts than there are slots (a prefill or a validation batch on a small cache) runs
in groups (:meth:`ExpertCache.acquire`): the experts the policy keeps stay in their main slots, the rest pass
through the staging slots, and nothing demanded earlier in the same call is evicted for a later group, so the next
call hits what was kept.

Prefetch (:meth:`ExpertCache.prefetch`) copies guessed experts ahead of their layer, so it must not cost more than
it saves: a wrong guess is link time the floor of the misses does not count, and can push out an expert that is
needed later. It therefore (1) copies, while the link still carries the current layer's demand misses
(:meth:`ExpertCache.link_busy`), only the guesses ``prefetch_when_busy`` allows (default ``first``: the likeliest
one; :func:`~moetrain.inference.policy.busy_guesses`): queued behind the misses, a right guess arrives when its
own miss would have and counts as a hit, a wrong one delays the next layer's misses by a copy; (2) takes only free
slots, staged entries of lower value, or the policy's victim where the policy lets a guess evict it
(:meth:`~moetrain.inference.policy.CachePolicy.prefetch_may_evict`: LFU never evicts an expert demanded more
often); (3) never replaces another guess for the same layer, while a guess its layer did not demand is the first
staged entry to go. ``stats.prefetch_wasted`` counts guesses replaced before any demand.

Events (CUDA): ``ready[s]`` is recorded on the copy stream after the copy into slot ``s``, and the compute
stream waits on it before reading the slot; ``freed[s]`` is recorded on the compute stream once the kernels
reading slot ``s`` are queued, and the copy stream waits on it before overwriting the slot. Host rows never
change during inference, so no other hazard exists. On the CPU both collapse and copies are plain copies;
the bookkeeping (what is cached, what a prefetch may evict, what counts as a hit) is the same.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch

from moetrain.inference.policy import (
    DEFAULT_CACHE_POLICY,
    DEFAULT_PREFETCH_WHEN_BUSY,
    PREFETCH_WHEN_BUSY,
    Key,
    busy_guesses,
    make_policy,
)
from moetrain.inference.store import HostExpertStore, dequantize_int8


@dataclass
class CacheStats:
    """Counters since the last :meth:`ExpertCache.reset_stats`.

    Attributes:
        demands: (layer, expert) pairs forward calls needed (an expert counts once per layer per call).
        hits: demands found on the device (cached, staged or prefetched) without a copy.
        prefetched: experts copied ahead of their layer; prefetch_hits: demands those copies served.
        prefetch_wasted: prefetched experts replaced before any demand (their bytes crossed the link for nothing;
            those still waiting at the end are :meth:`ExpertCache.unused_prefetches`).
        prefetch_skipped: guessed experts not copied: the link was busy and ``prefetch_when_busy`` left them out,
            or no slot of lower value was free.
        bytes_paged: host-to-device bytes, demand misses and prefetches together.
        evictions: cached experts replaced.
    """

    demands: int = 0
    hits: int = 0
    prefetched: int = 0
    prefetch_hits: int = 0
    prefetch_wasted: int = 0
    prefetch_skipped: int = 0
    bytes_paged: int = 0
    evictions: int = 0

    @property
    def misses(self) -> int:
        return self.demands - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.demands if self.demands else 0.0


def ideal_static_hit_rate(trace: Sequence[Key], slots: int) -> float:
    """The hit rate of the best fixed set of ``slots`` experts on ``trace`` (demanded (layer, expert) pairs).

    Every expert takes one slot, so the best set is the ``slots`` most frequently demanded experts: its hits
    are their demand counts.
    """
    if not trace:
        return 0.0
    counts = sorted(Counter(trace).values(), reverse=True)
    return sum(counts[:slots]) / len(trace)


@dataclass
class _Slot:
    key: Optional[Key] = None
    staged: bool = False  # in the staging ring, not managed by the policy
    prefetched: bool = False  # brought by a prefetch, not demanded since
    ready: Optional[torch.cuda.Event] = None
    freed: Optional[torch.cuda.Event] = None


@dataclass
class Acquired:
    """Experts of one layer placed in slots for the compute that follows: ``slots[i]`` holds ``experts[i]``."""

    layer: int
    experts: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)


class ExpertCache:
    """Expert slots on ``device`` filled from ``store``.

    Args:
        store: the host rows.
        num_slots: expert slots on the device in all (main and staging).
        device: the compute device.
        policy: ``lru`` or ``lfu`` (default :data:`~moetrain.inference.policy.DEFAULT_CACHE_POLICY`, lfu).
        prefetch_when_busy: which guesses :meth:`prefetch` copies while :meth:`link_busy`: ``never``, ``first``
            (the likeliest) or ``always`` (:data:`~moetrain.inference.policy.PREFETCH_WHEN_BUSY`).
        staging_slots: slots kept out of the policy's reach for experts it does not admit (default: a quarter of
            the slots, at most 8, none when the cache holds every expert).
    """

    def __init__(self, store: HostExpertStore, num_slots: int, device: torch.device, *,
                 policy: str = DEFAULT_CACHE_POLICY, staging_slots: Optional[int] = None,
                 prefetch_when_busy: str = DEFAULT_PREFETCH_WHEN_BUSY) -> None:
        if num_slots < 1:
            raise ValueError(f"the expert cache needs at least one slot, got {num_slots}")
        if prefetch_when_busy not in PREFETCH_WHEN_BUSY:
            raise ValueError(f"prefetch_when_busy={prefetch_when_busy!r}: choose one of "
                             f"{', '.join(PREFETCH_WHEN_BUSY)}")
        self.store, self.device = store, torch.device(device)
        num_slots = min(num_slots, store.total_experts)
        if staging_slots is None:
            staging_slots = 0 if num_slots >= store.total_experts else min(8, max(1, num_slots // 4))
        self.num_slots = num_slots
        self.staging_slots = min(staging_slots, num_slots - 1)
        self.policy_name = policy
        self.policy = make_policy(policy)
        cuda = self.device.type == "cuda"
        self.data = torch.empty((num_slots, store.row_numel), dtype=store.storage_dtype, device=self.device)
        self.scales = (torch.empty((num_slots, store.scale_numel), dtype=torch.float32, device=self.device)
                       if store.quantized else None)
        self.slots = [_Slot(staged=i >= num_slots - self.staging_slots,
                            ready=torch.cuda.Event() if cuda else None, freed=torch.cuda.Event() if cuda else None)
                      for i in range(num_slots)]
        self.slot_of: dict[Key, int] = {}
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.protected: set[int] = set()  # slots the current layer's compute reads
        self._stage_next = num_slots - self.staging_slots
        self._step = 0  # layer calls so far (a call computed in groups counts once)
        self._miss_step = -1  # the layer call in which the last demand miss was queued
        self._miss_slot: Optional[int] = None  # the slot that miss went to
        self.stats = CacheStats()
        self.trace: list[Key] = []
        self.record_trace = True
        self.prefetch_when_busy = prefetch_when_busy

    # ------------------------------------------------------------------ sizes and counters
    @property
    def device_bytes(self) -> int:
        return self.num_slots * self.store.row_bytes

    @property
    def main_slots(self) -> int:
        return self.num_slots - self.staging_slots

    def reset_stats(self) -> CacheStats:
        """Start new counters and a new trace; returns the old counters. Experts prefetched before count as cached
        from now on (their bytes are the old counters'), so the new ones describe the new window alone."""
        stats, self.stats = self.stats, CacheStats()
        for s in self.slots:
            s.prefetched = False
        self.trace = []
        return stats

    def ideal_static_hit_rate(self) -> float:
        """:func:`ideal_static_hit_rate` of this cache's trace at its number of slots."""
        return ideal_static_hit_rate(self.trace, self.num_slots)

    # ------------------------------------------------------------------ placing experts
    def _copy_in(self, slot: int, key: Key) -> None:
        """Queue the copy of ``key``'s host row into ``slot`` (the copy stream waits for the slot's readers)."""
        layer, expert = key
        s = self.slots[slot]
        stream = self.copy_stream
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            if stream is not None:
                stream.wait_event(s.freed)
            row, scales = self.store.row(layer, expert)
            self.data[slot].copy_(row, non_blocking=True)
            if self.scales is not None:
                self.scales[slot].copy_(scales, non_blocking=True)
            if stream is not None:
                s.ready.record(stream)
        self.stats.bytes_paged += self.store.row_bytes

    def link_busy(self) -> bool:
        """Whether the copy stream still carries the current layer call's demand misses.

        A prefetch queued behind them would start only when they are done, and every guess that turns out wrong
        then delays the next layer's own misses by a whole copy. On CUDA the last miss's ``ready`` event says
        whether it is done (a prefetch is offered right after the misses are queued: for an expert as large as
        Mixtral-8x7B's, 352 MB or 6.5 ms at 54 GB/s, it never is). On the CPU copies are plain and synchronous, and
        a miss counts as running through its layer call, so the CPU makes the decisions a GPU makes there.
        """
        if self._miss_step != self._step or self._miss_slot is None:
            return False
        ready = self.slots[self._miss_slot].ready
        return ready is None or not ready.query()

    def unused_prefetches(self) -> int:
        """Prefetched experts on the device that no demand has used yet."""
        return sum(s.prefetched for s in self.slots)

    def _unmap(self, slot: int) -> None:
        s = self.slots[slot]
        if s.key is not None:
            del self.slot_of[s.key]
            if not s.staged:
                self.policy.evicted(s.key)
                self.stats.evictions += 1
            if s.prefetched:
                self.stats.prefetch_wasted += 1
        s.key, s.prefetched = None, False

    def _evictable(self, keep: frozenset[Key]) -> list[Key]:
        """Main-slot entries that may make room: not read by the current compute, not kept for this layer."""
        return [s.key for i, s in enumerate(self.slots[:self.main_slots])
                if i not in self.protected and s.key is not None and s.key not in keep]

    def _main_slot_for(self, key: Key, keep: frozenset[Key], scan: bool) -> Optional[int]:
        """A main slot for ``key``: a free one, else the policy's victim (outside ``keep``) if it admits ``key``."""
        main = range(self.main_slots)
        free = next((i for i in main if self.slots[i].key is None and i not in self.protected), None)
        if free is not None:
            return free
        victim = self.policy.victim(self._evictable(keep))
        if victim is None or not self.policy.admit(key, victim, scan=scan):
            return None
        return self.slot_of[victim]

    def _staging_slot(self) -> Optional[int]:
        """A staging slot not read by the current layer: a free one, else one holding a guess no demand used (its
        layer has been computed since: a prefetch is for the next layer only), else the next of the ring (the
        oldest staged expert goes first)."""
        start = self.num_slots - self.staging_slots
        idle = [i for i in range(start, self.num_slots) if i not in self.protected]
        for i in idle:
            if self.slots[i].key is None or self.slots[i].prefetched:
                return i
        for step in range(self.staging_slots):
            i = start + (self._stage_next - start + step) % self.staging_slots
            if i not in self.protected:
                self._stage_next = start + (i - start + 1) % self.staging_slots
                return i
        return None

    def _place(self, key: Key, *, keep: frozenset[Key] = frozenset(), scan: bool = False,
               must: bool = False) -> Optional[int]:
        """Map demanded ``key`` to a slot and queue its copy: a main slot the policy gives, else a staging slot; None
        when neither is free of the current compute's reads. ``must`` (the group has no expert yet: it must make
        progress) then takes the policy's victim outside ``keep``, else any slot the compute does not read."""
        slot = self._main_slot_for(key, keep, scan)
        if slot is None:
            slot = self._staging_slot()
        if slot is None and must:
            victim = self.policy.victim(self._evictable(keep))
            slot = self.slot_of[victim] if victim is not None else next(
                (i for i in range(self.num_slots) if i not in self.protected), None)
        if slot is None:
            return None
        self._fill(slot, key, prefetch=False)
        self._miss_step, self._miss_slot = self._step, slot
        return slot

    def _fill(self, slot: int, key: Key, *, prefetch: bool) -> None:
        """Map ``key`` to ``slot`` (dropping what it held) and queue its copy."""
        self._unmap(slot)
        s = self.slots[slot]
        s.key, s.prefetched = key, prefetch
        self.slot_of[key] = slot
        if not s.staged:
            self.policy.inserted(key, prefetch=prefetch)
        self._copy_in(slot, key)

    def _prefetch_slot(self, key: Key, keep: frozenset[Key]) -> Optional[int]:
        """A slot a guess of ``key`` may take: free, else the policy's main victim if the policy lets a guess evict
        it, else the least valued staged entry the policy lets it evict (a guess no demand used goes first; LRU
        ranks no staged entry: the oldest), never a slot the compute reads nor one of ``keep`` (this call's
        other guesses). None: every expert on the device is worth more than the guess."""
        free = next((i for i, s in enumerate(self.slots) if s.key is None and i not in self.protected), None)
        if free is not None:
            return free
        victim = self.policy.victim(self._evictable(keep))
        if victim is not None and self.policy.prefetch_may_evict(key, victim):
            return self.slot_of[victim]
        staged = [i for i in range(self.main_slots, self.num_slots)
                  if i not in self.protected and self.slots[i].key not in keep]
        stale = next((i for i in staged if self.slots[i].prefetched), None)
        if stale is not None:
            return stale
        victim = self.policy.victim(self.slots[i].key for i in staged)
        if victim is None:  # LRU ranks main entries only: the ring's next
            slot = self._staging_slot()
            victim = None if slot is None or slot not in staged else self.slots[slot].key
        return self.slot_of[victim] if victim is not None and self.policy.prefetch_may_evict(key, victim) else None

    def acquire(self, layer: int, experts: Sequence[int], *, done: Iterable[int] = ()) -> Acquired:
        """Place as many of ``layer``'s ``experts`` as the slots allow (hits first), protect their slots until
        :meth:`release`, and count each as a demand. Always places at least one expert when given any.

        Experts left out (more than the slots hold) are not counted: call again after :meth:`release`, with the
        experts computed so far in ``done``. A layer that routes to more experts than there are slots is thus
        computed in groups: its cached experts (hits, and the misses the policy gave a main slot) stay where they
        are, and the rest pass through the staging slots, a group at a time. A miss never evicts an expert of
        ``done`` nor of the current group: they were demanded in this same call, so no policy ranks them below
        the newcomer, and evicting them would leave the next call nothing of this layer to hit. Such a layer is a
        scan to the policy (:meth:`CachePolicy.admit`): under LRU its misses evict no other layer's expert either.
        """
        got = Acquired(layer)
        if not done:
            self._step += 1  # a new layer call (later groups of the same call pass ``done``)
        keep = frozenset((layer, e) for e in done)
        scan = len(experts) + len(keep) > self.num_slots  # the layer runs in groups
        hits = [e for e in experts if (layer, e) in self.slot_of]
        misses = [e for e in experts if (layer, e) not in self.slot_of]
        for e in hits + misses:
            key = (layer, e)
            slot = self.slot_of.get(key)
            if slot is None:
                slot = self._place(key, keep=keep, scan=scan, must=not got.experts)
                if slot is None:
                    continue  # no slot left to this group: the caller computes what it has and comes back
            else:
                self.stats.hits += 1
                if self.slots[slot].prefetched:
                    self.stats.prefetch_hits += 1
            self.slots[slot].prefetched = False
            self.stats.demands += 1
            self.policy.touch(key)
            if self.record_trace:
                self.trace.append(key)
            self.protected.add(slot)
            got.experts.append(e)
            got.slots.append(slot)
        return got

    def prefetch(self, layer: int, experts: Iterable[int]) -> int:
        """Start copying ``layer``'s ``experts`` (most likely first) that are not on the device (while the link is
        busy (:meth:`link_busy`) only those ``prefetch_when_busy`` allows), into slots the current compute does not
        read and whose entries the policy values less than a guess (:meth:`_prefetch_slot`). Returns the number of
        copies started."""
        wanted = [(layer, e) for e in experts if (layer, e) not in self.slot_of]
        allowed = wanted
        if wanted and self.link_busy():
            allowed = busy_guesses(self.prefetch_when_busy, wanted)
            self.stats.prefetch_skipped += len(wanted) - len(allowed)
        started = 0
        for key in allowed:
            slot = self._prefetch_slot(key, frozenset(wanted))
            if slot is None:
                self.stats.prefetch_skipped += 1
                continue
            self._fill(slot, key, prefetch=True)
            self.stats.prefetched += 1
            started += 1
        return started

    def weights(self, slot: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate (I, H), up (I, H), down (H, I)) of the expert in ``slot``, ready on the current stream."""
        s = self.slots[slot]
        if s.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(s.ready)
        row = self.data[slot]
        (i, h), _, _ = self.store.shapes()
        ih = i * h
        parts = (row[:ih].view(i, h), row[ih:2 * ih].view(i, h), row[2 * ih:].view(h, i))
        if self.scales is None:
            return tuple(p if p.dtype == dtype else p.to(dtype) for p in parts)  # type: ignore[return-value]
        sc = self.scales[slot]
        return (dequantize_int8(parts[0], sc[:i], dtype), dequantize_int8(parts[1], sc[i:2 * i], dtype),
                dequantize_int8(parts[2], sc[2 * i:], dtype))

    def grouped_weights(self, slots: Sequence[int], dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """The weights of the experts in ``slots`` stacked for ``torch._grouped_mm``, ready on the current stream.

        Returns:
            (gate (G, I, H), up (G, I, H), down (G, H, I), position): ``position[i]`` is where ``slots[i]``'s
            expert lies along G. Weights already of ``dtype`` are strided views of the whole slot buffer (G = S
            slots, position = slot: no copy; groups of other slots must get no rows); int8 or other-dtype slots
            are gathered and dequantized (G = len(slots), position = 0, 1, ...).
        """
        if self.slots[0].ready is not None:
            stream = torch.cuda.current_stream(self.device)
            for slot in slots:
                stream.wait_event(self.slots[slot].ready)
        (i, h), _, _ = self.store.shapes()
        ih = i * h
        if self.scales is None and self.data.dtype == dtype:
            d = self.data  # (S, P): row s = gate | up | down of slot s's expert
            return (d[:, :ih].unflatten(1, (i, h)), d[:, ih:2 * ih].unflatten(1, (i, h)),
                    d[:, 2 * ih:].unflatten(1, (h, i)), list(slots))
        index = torch.tensor(list(slots), dtype=torch.int64, device=self.device)
        rows = self.data.index_select(0, index)  # (G, P)
        parts = [rows[:, :ih].unflatten(1, (i, h)), rows[:, ih:2 * ih].unflatten(1, (i, h)),
                 rows[:, 2 * ih:].unflatten(1, (h, i))]
        if self.scales is None:
            parts = [p.to(dtype) for p in parts]
        else:  # as dequantize_int8, per expert: (q.float() * scale[:, None]).to(dtype)
            sc = self.scales.index_select(0, index)  # (G, 2I + H)
            bounds = ((0, i), (i, 2 * i), (2 * i, 2 * i + h))
            parts = [(p.float() * sc[:, a:b, None]).to(dtype) for p, (a, b) in zip(parts, bounds, strict=True)]
        return parts[0], parts[1], parts[2], list(range(len(slots)))

    def release(self, got: Acquired) -> None:
        """The kernels reading ``got``'s slots are queued: the slots may be refilled once they have run."""
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for slot in got.slots:
            if stream is not None:
                self.slots[slot].freed.record(stream)
            self.protected.discard(slot)


def slots_for_budget(budget_bytes: float, row_bytes: int, total_experts: int) -> int:
    """How many expert slots of ``row_bytes`` fit ``budget_bytes`` (at least 1, at most every expert)."""
    return max(1, min(total_experts, int(budget_bytes // row_bytes)))
