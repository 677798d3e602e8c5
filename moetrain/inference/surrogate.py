"""A surrogate of paged decode on a GPU, run on the CPU: recorded routing traces replayed through the real
:class:`~moetrain.inference.cache.ExpertCache` (any policy, number of slots or ``prefetch_when_busy``), timed by a
model of the host, the compute stream and the copy stream calibrated on an H200 run (q3).

Traces. A paged model's routing does not depend on its cache (its outputs equal resident ones), so one recording
serves every policy: :func:`record_routing` keeps, while a paged model generates, for every MoE layer call the
experts it routed and the guesses it offered the cache (``PagedExperts._guess``). :func:`replay` makes
the same cache calls as :class:`~moetrain.inference.paged.PagedExperts` in the same order on a cache of
placeholder rows, so its counters (hits, misses, prefetches used, wasted and skipped, the ideal static hit rate)
are exactly those of a generation on that trace (``tests/inference/test_surrogate.py`` checks it), and its figures
are those of ``moetrain bench paged_generate``: hit rate over the ideal static cache's, experts paged, missed and
wasted per token, decode time per token, the floor (resident time + the misses' copies) and time over the floor.

Timing (:class:`DecodeTiming`). Per MoE layer of a decode step the host launches the layer's work up to the read of
the routed experts (norms, attention, router, lookahead) and reads them, which waits for the compute stream to
finish everything queued before: the previous layer's experts among it, which wait for their slots' copies. It then
queues the layer's misses and prefetches on the copy stream (each copy one expert's row at the link rate, after the
copies queued before it and after the last kernel that read its slot), launches the experts (hits first; each waits
for its slot's copy) and the combine, and goes on without waiting. The step ends with the logits, the next token
and its read. A miss thus costs the part of its copy the host's and the GPU's work up to the next read does not
cover, which can be less than a copy: how a run can beat the floor, as q3's LFU run did (0.94).
:meth:`DecodeTiming.from_shares` sets the host's and the GPU's times from the resident step (measured) and two
shares, which :func:`calibrate` fits to q3's vs floor for LRU and LFU (:func:`q3_timing`).

``python -m moetrain.inference.surrogate tests/inference/data/mixtral_4l_routing.json [--calibrate]`` prints the
predictions of :mod:`moetrain.inference.policy`'s tables (twelve traces of random Mixtral-8x7B-shaped models of the
bench's 4-layer shape, recorded on the CPU).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from moetrain.inference.cache import ExpertCache
from moetrain.inference.store import HostExpertStore


@dataclass
class LayerCall:
    """One MoE layer's call: the ``experts`` it routed (ascending, as :class:`PagedExperts` acquires them) and the
    experts of ``next_layer`` it offered the cache to prefetch (``guess``, likeliest first; empty: none), chosen
    by :func:`~moetrain.inference.paged.likely_experts` from the lookahead's ``votes`` and ``mass`` (E,) each."""

    layer: int
    experts: list[int]
    next_layer: Optional[int] = None
    guess: list[int] = field(default_factory=list)
    votes: list[float] = field(default_factory=list)
    mass: list[float] = field(default_factory=list)


@dataclass
class RoutingRecord:
    """The layer calls of a generation, one list per forward (the prompt's first, then one per decode step)."""

    layers: list[int]
    num_experts: int
    forwards: list[list[LayerCall]] = field(default_factory=list)
    note: str = ""

    def to_json(self, *, compact: bool = False) -> str:
        """JSON text (``compact``: without the votes and mass, which :func:`replay` does not read)."""
        def call(c: LayerCall) -> list:
            if compact:
                return [c.layer, c.experts, c.next_layer, c.guess]
            return [c.layer, c.experts, c.next_layer, c.guess, [int(v) for v in c.votes],
                    [round(m, 5) for m in c.mass]]
        return json.dumps({"layers": self.layers, "num_experts": self.num_experts, "note": self.note,
                           "forwards": [[call(c) for c in f] for f in self.forwards]}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RoutingRecord:
        raw = json.loads(text)
        return cls(raw["layers"], raw["num_experts"], [[LayerCall(*c) for c in f] for f in raw["forwards"]],
                   raw.get("note", ""))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RoutingRecord:
        return cls.from_json(Path(path).read_text())


def save_records(records: dict[str, RoutingRecord], path: str | Path, *, compact: bool = True) -> None:
    """Write named records to one JSON file (``compact``: without the lookahead's votes and mass)."""
    Path(path).write_text("{\n" + ",\n".join(f"{json.dumps(name)}: {r.to_json(compact=compact)}"
                                              for name, r in records.items()) + "\n}\n")


def load_records(path: str | Path) -> dict[str, RoutingRecord]:
    """The named records of :func:`save_records`."""
    return {name: RoutingRecord.from_json(json.dumps(raw)) for name, raw in json.loads(Path(path).read_text()).items()}


@contextmanager
def record_routing(model, *, note: str = "") -> Iterator[RoutingRecord]:
    """While open, every MoE layer call of ``model`` (paged experts, prefetch on) appends what it routed and offered
    to prefetch to the yielded record, a forward a list::

        with record_routing(model) as record:
            generate(model, prompt, max_new_tokens=64)
    """
    from moetrain.inference.paged import PagedExperts

    blocks = [b.experts for b in model.moe_blocks()]
    if not blocks or not all(isinstance(b, PagedExperts) and b.prefetch for b in blocks):
        raise ValueError("record_routing needs a model whose experts are paged, with prefetch on")
    record = RoutingRecord([b.layer_idx for b in blocks], blocks[0].num_experts, note=note)
    first = blocks[0]

    def wrap(module: PagedExperts):
        original = module._guess

        def guess(predicted):
            offered = original(predicted)
            if module is first:
                record.forwards.append([])
            if predicted is None:  # the last layer: the first layer's routing of this call
                votes, mass = first.last_counts, first.last_mass
            else:
                votes, mass = predicted[:module.num_experts], predicted[module.num_experts:]
            record.forwards[-1].append(LayerCall(module.layer_idx, list(module.last_routed), module.next_layer,
                                                 list(offered), list(votes), list(mass)))
            return offered
        return guess

    try:
        for module in blocks:
            module._guess = wrap(module)
        yield record
    finally:
        for module in blocks:
            del module._guess


@dataclass
class DecodeTiming:
    """The timing model of one decode step (seconds; see the module docstring): per MoE layer, the host launches
    the work before the read of the routed experts (``host_pre_s``: norms, attention, router, lookahead; the GPU
    runs it in ``gpu_pre_s``), reads (waiting for the compute stream), queues the copies, launches the experts
    (``gpu_expert_s`` each on the GPU, after its slot's copy) and the combine (``host_post_s``); the step ends with
    the logits and the next token (``host_end_s``, ``gpu_end_s``) and their read.

    Attributes:
        copy_s: one expert's host-to-device copy (row bytes / link rate).
    """

    copy_s: float
    host_pre_s: float
    host_post_s: float
    gpu_pre_s: float = 0.0
    gpu_expert_s: float = 0.0
    host_end_s: float = 0.0
    gpu_end_s: float = 0.0

    @classmethod
    def from_shares(cls, *, copy_s: float, resident_s: float, layers: int, top_k: int, gpu_share: float,
                    read_share: float, end_share: float = 0.05, expert_share: float = 0.2) -> DecodeTiming:
        """The timing whose resident step takes ``resident_s`` (``layers`` MoE layers, ``top_k`` experts each):
        per layer the host takes H (``read_share`` of it before the read), the GPU ``gpu_share`` x H
        (``expert_share`` of that in the experts); the step's end takes ``end_share`` x ``layers`` x H on the host
        and ``gpu_share`` times that on the GPU. H is solved for."""
        def make(host: float) -> DecodeTiming:
            gpu = gpu_share * host
            return cls(copy_s=copy_s, host_pre_s=read_share * host, host_post_s=(1 - read_share) * host,
                       gpu_pre_s=(1 - expert_share) * gpu, gpu_expert_s=expert_share * gpu / top_k,
                       host_end_s=end_share * layers * host, gpu_end_s=end_share * layers * gpu)
        lo, hi = 0.0, resident_s
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if make(mid).resident_s_per_token(layers, top_k) < resident_s else (lo, mid)
        return make((lo + hi) / 2)

    def resident_s_per_token(self, layers: int, top_k: int) -> float:
        """A resident decode step: :func:`replay`'s clock without copies."""
        c = _Clock()
        for _ in range(3):  # the steady state
            start = c.host
            for _ in range(layers):
                _before_read(c, self)
                for _ in range(top_k):
                    c.gpu = max(c.gpu, c.host) + self.gpu_expert_s
                c.host += self.host_post_s
            _step_end(c, self)
        return c.host - start


def _before_read(c: _Clock, t: DecodeTiming) -> None:
    """The host launches a layer's work up to the read of its routed experts, and reads (waits for the GPU)."""
    start = c.host
    c.host += t.host_pre_s
    c.gpu = max(max(c.gpu, start) + t.gpu_pre_s, c.host)
    c.host = c.gpu


def _step_end(c: _Clock, t: DecodeTiming) -> None:
    start = c.host
    c.host += t.host_end_s
    c.gpu = max(max(c.gpu, start) + t.gpu_end_s, c.host)
    c.host = c.gpu


class _Clock:
    """The modeled host (h), compute stream (g) and copy stream (link) clocks, and each slot's events."""

    def __init__(self) -> None:
        self.host = self.gpu = self.link = 0.0
        self.ready: dict[int, float] = {}
        self.freed: dict[int, float] = {}
        self.on = False


class _ReplayCache(ExpertCache):
    """An :class:`ExpertCache` of placeholder rows whose copies advance a :class:`_Clock`."""

    def __init__(self, *args, clock: _Clock, copy_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clock, self.copy_s = clock, copy_s

    def _copy_in(self, slot: int, key) -> None:
        super()._copy_in(slot, key)
        c = self.clock
        start = max(c.link, c.host, c.freed.get(slot, 0.0))
        c.link = start + self.copy_s
        c.ready[slot] = c.link


def replay(record: RoutingRecord, *, slots: int, policy: str, timing: Optional[DecodeTiming] = None,
           prefetch: bool = True, staging_slots: Optional[int] = None, decode_from: int = 1, **cache_kwargs) -> dict:
    """Drive an :class:`ExpertCache` of ``slots`` slots with ``record``'s calls as :class:`PagedExperts` makes them,
    the counters reset after the first ``decode_from`` forwards (the prompt's), and time the rest with ``timing``.

    Returns the figures of ``moetrain bench paged_generate`` for the decode phase: ``hit_rate``,
    ``ideal_static_hit_rate``, ``hit_vs_ideal``, ``retained_hit_rate``, ``prefetched``, ``prefetch_hits``,
    ``prefetch_skipped``; ``experts_paged_per_token``, ``misses_per_token`` and ``wasted_per_token`` (in experts:
    times an expert's bytes for the bench's bytes); with ``timing``: ``s_per_token``, ``resident_s_per_token``,
    ``floor_s_per_token`` (resident + misses' copies) and ``vs_floor``.
    """
    store = HostExpertStore(record.layers, record.num_experts, 1, 1, dtype=torch.float32)
    clock = _Clock()
    cache = _ReplayCache(store, slots, torch.device("cpu"), policy=policy, staging_slots=staging_slots, clock=clock,
                         copy_s=timing.copy_s if timing else 0.0, **cache_kwargs)
    top_k = max((len(c.experts) for f in record.forwards[decode_from:] for c in f), default=1)
    for index, forward in enumerate(record.forwards):
        if index == decode_from:
            cache.reset_stats()
            clock.on = True
            clock.host = clock.gpu = clock.link = 0.0
            clock.ready.clear()
            clock.freed.clear()
        for call in forward:
            _layer(cache, call, prefetch, timing if clock.on else None)
        if timing is not None and clock.on:
            _step_end(clock, timing)
    tokens = max(len(record.forwards) - decode_from, 1)
    s = cache.stats
    ideal = cache.ideal_static_hit_rate()
    unused = cache.unused_prefetches()
    out = {"hit_rate": s.hit_rate, "ideal_static_hit_rate": ideal,
           "hit_vs_ideal": s.hit_rate / ideal if ideal else None,
           "retained_hit_rate": (s.hits - s.prefetch_hits) / max(s.demands, 1), "prefetched": s.prefetched,
           "prefetch_hits": s.prefetch_hits, "prefetch_skipped": s.prefetch_skipped,
           "experts_paged_per_token": (s.misses + s.prefetched) / tokens, "misses_per_token": s.misses / tokens,
           "wasted_per_token": (s.prefetch_wasted + unused) / tokens, "demands": s.demands, "hits": s.hits}
    if timing is not None:
        per_token = clock.host / tokens
        resident = timing.resident_s_per_token(len(record.layers), top_k)
        floor = resident + out["misses_per_token"] * timing.copy_s
        out.update(s_per_token=per_token, resident_s_per_token=resident, floor_s_per_token=floor,
                   vs_floor=per_token / floor)
    return out


def _layer(cache: ExpertCache, call: LayerCall, prefetch: bool, timing: Optional[DecodeTiming]) -> None:
    """One layer call as :meth:`PagedExperts.forward` makes it, and its time when ``timing`` is given."""
    clock: _Clock = cache.clock  # type: ignore[attr-defined]
    if timing is not None:
        _before_read(clock, timing)  # the read of the routed experts waits for the compute stream
    todo, done, first = list(call.experts), [], True
    while todo:
        got = cache.acquire(call.layer, todo, done=done)
        if first and len(got.experts) == len(todo) and prefetch and call.guess and call.next_layer is not None:
            cache.prefetch(call.next_layer, call.guess)
        first = False
        if timing is not None:
            for slot in got.slots:
                clock.gpu = max(clock.gpu, clock.host, clock.ready.get(slot, 0.0)) + timing.gpu_expert_s
                clock.freed[slot] = clock.gpu
        cache.release(got)
        done += got.experts
        todo = [e for e in todo if e not in set(got.experts)]
    if timing is not None:
        clock.host += timing.host_post_s


# ---------------------------------------------------------------------------------------------- run q3
Q3_EXPERT_BYTES = 352_321_536
"""One Mixtral-8x7B expert in bf16 (3 x 4096 x 14336 x 2 bytes)."""
Q3_LINK_GB_S = 53.96
Q3_RESIDENT_S = 0.013766
"""Run q3 (H200): the link's rate and the resident decode's time per token on the 4-layer Mixtral-8x7B shape."""
Q3_MEASURED = {
    "lru": {"s_per_token": 0.03042, "hit_rate": 0.7044, "ideal_static_hit_rate": 0.8016, "hit_vs_ideal": 0.8787,
            "gb_per_token": 1.197, "miss_gb_per_token": 0.833, "wasted_gb_per_token": 0.134, "prefetched": 65,
            "prefetch_hits": 41, "prefetch_skipped": 62, "vs_floor": 1.041},
    "lfu": {"s_per_token": 0.02565, "hit_rate": 0.7421, "ideal_static_hit_rate": 0.8016, "hit_vs_ideal": 0.9257,
            "gb_per_token": 1.040, "miss_gb_per_token": 0.727, "wasted_gb_per_token": 0.112, "prefetched": 56,
            "prefetch_hits": 36, "prefetch_skipped": 91, "vs_floor": 0.941},
}
"""What ``moetrain bench paged_generate --preset mixtral-8x7b --layers 4`` measured in run q3 (22 of 32 slots, 128
prompt tokens, 63 decode steps) with ``prefetch_when_busy=never`` (the policy then, guesses ordered by votes)."""
Q3_GPU_SHARE, Q3_READ_SHARE = 0.75, 0.5
"""The shares of :meth:`DecodeTiming.from_shares` fitted by :func:`calibrate` on the recorded Mixtral traces."""


def q3_timing(*, gpu_share: float = Q3_GPU_SHARE, read_share: float = Q3_READ_SHARE) -> DecodeTiming:
    """The timing of run q3's H200 (Mixtral-8x7B experts at its link rate, its resident step), 4 layers, top-2."""
    return DecodeTiming.from_shares(copy_s=Q3_EXPERT_BYTES / (Q3_LINK_GB_S * 1e9), resident_s=Q3_RESIDENT_S,
                                    layers=4, top_k=2, gpu_share=gpu_share, read_share=read_share)


def ensemble(records: dict[str, RoutingRecord], **replay_kwargs) -> dict[str, dict[str, float]]:
    """:func:`replay` of every record: per figure its ``mean``, ``min`` and ``max`` over the records, and
    ``passes``: the records on which ``hit_vs_ideal`` >= 0.95 (and ``vs_floor`` <= 1.3 when timed)."""
    runs = [replay(r, **replay_kwargs) for r in records.values()]
    out = {key: {"mean": sum(r[key] for r in runs) / len(runs), "min": min(r[key] for r in runs),
                 "max": max(r[key] for r in runs)} for key in runs[0] if isinstance(runs[0][key], (int, float))}
    out["passes"] = {"mean": sum(r["hit_vs_ideal"] >= 0.95 and r.get("vs_floor", 0.0) <= 1.3 for r in runs),
                     "min": 0, "max": len(runs)}
    return out


def calibrate(records: dict[str, RoutingRecord], *, slots: int = 22,
              gpu_shares: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0),
              read_shares: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9)) -> tuple[float, float, dict[str, float]]:
    """The (gpu_share, read_share) of :func:`q3_timing` whose mean ``vs_floor`` over ``records``, replayed with run
    q3's policy (``prefetch_when_busy=never``), is nearest run q3's for LRU and LFU (least squares over the grid);
    returns them and the fitted means. vs_floor, not the time: the records' misses differ from q3's trace's."""
    best: Optional[tuple[float, float, float, dict[str, float]]] = None
    for gpu_share in gpu_shares:
        for read_share in read_shares:
            timing = q3_timing(gpu_share=gpu_share, read_share=read_share)
            fit = {policy: ensemble(records, slots=slots, policy=policy, timing=timing,
                                    prefetch_when_busy="never")["vs_floor"]["mean"] for policy in Q3_MEASURED}
            err = sum((fit[p] - Q3_MEASURED[p]["vs_floor"]) ** 2 for p in fit)
            if best is None or err < best[0]:
                best = (err, gpu_share, read_share, fit)
    assert best is not None
    return best[1], best[2], best[3]


def _span(v: dict[str, float], scale: float = 1.0, fmt: str = ".3f") -> str:
    """An :func:`ensemble` figure as "mean [min, max]"."""
    return f"{v['mean'] * scale:{fmt}} [{v['min'] * scale:{fmt}}, {v['max'] * scale:{fmt}}]"


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m moetrain.inference.surrogate RECORDS.json``: the candidates' predicted figures (the table of
    :mod:`moetrain.inference.policy`) on the records of :func:`save_records`, timed by :func:`q3_timing`."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m moetrain.inference.surrogate", description=main.__doc__)
    p.add_argument("records", type=Path)
    p.add_argument("--slots", type=int, default=22)
    p.add_argument("--calibrate", action="store_true", help="fit the timing's shares to run q3 first")
    args = p.parse_args(argv)
    records = load_records(args.records)
    shares = {}
    if args.calibrate:
        gpu_share, read_share, fit = calibrate(records, slots=args.slots)
        shares = {"gpu_share": gpu_share, "read_share": read_share}
        print(f"calibrated: gpu_share {gpu_share} read_share {read_share}; mean vs_floor "
              + ", ".join(f"{k} {v:.3f} (q3 {Q3_MEASURED[k]['vs_floor']})" for k, v in fit.items()))
    timing = q3_timing(**shares)
    gb = Q3_EXPERT_BYTES / 1e9
    print(f"{len(records)} records, {args.slots} slots; mean [min, max] over the records")
    for policy in ("lru", "lfu"):
        for busy in ("never", "first", "always"):
            e = ensemble(records, slots=args.slots, policy=policy, timing=timing, prefetch_when_busy=busy)
            print(f"{policy} {busy:6s} ms/token {_span(e['s_per_token'], 1e3, '.1f')} "
                  f"vs_floor {_span(e['vs_floor'])} hit/ideal {_span(e['hit_vs_ideal'])} "
                  f"GB/token {_span(e['experts_paged_per_token'], gb)} "
                  f"wasted GB/token {_span(e['wasted_per_token'], gb)} "
                  f"prefetched {e['prefetched']['mean']:.0f} hits {e['prefetch_hits']['mean']:.0f} "
                  f"skipped {e['prefetch_skipped']['mean']:.0f} both targets {e['passes']['mean']:.0f}/{len(records)}")
    return 0


__all__: Sequence[str] = ("DecodeTiming", "LayerCall", "RoutingRecord", "calibrate", "ensemble", "load_records",
                          "q3_timing", "record_routing", "replay", "save_records")


if __name__ == "__main__":
    raise SystemExit(main())
