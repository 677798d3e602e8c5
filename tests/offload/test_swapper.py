"""Device slots: page-in/out correctness, eviction by routing frequency, prefetch, look-ahead accounting."""

from __future__ import annotations

import torch
from offload_harness import OPTIM, tiny_model

from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig
from moetrain.offload.slots import SlotState
from moetrain.offload.store import ExpertStore
from moetrain.offload.swapper import Swapper


def _store_and_swapper(slots: int):
    store = ExpertStore(tiny_model(num_experts=4), OffloadConfig(tier="cpu"))
    return store, Swapper(store, torch.device("cpu"), slots)


def test_page_in_and_write_back():
    store, swapper = _store_and_swapper(2)
    rec = store.records[(0, 1)]
    (flat,) = swapper.acquire([rec])
    assert torch.equal(flat, store.host_view(rec)) and flat.data_ptr() != store.host_view(rec).data_ptr()
    assert swapper.slots[swapper.slot_of[rec.key]].state is SlotState.IN_USE
    flat.add_(1.0)
    swapper.release([rec])
    swapper.flush()
    assert torch.equal(store.host_view(rec), flat)
    assert swapper.stats.h2d_bytes == swapper.stats.d2h_bytes == rec.state_bytes


def test_eviction_by_routing_frequency():
    store, swapper = _store_and_swapper(2)
    hot, cold, new = store.records[(0, 0)], store.records[(0, 1)], store.records[(1, 0)]
    hot.frequency, cold.frequency = 5.0, 1.0
    swapper.acquire([hot, cold])
    swapper.release([hot, cold])
    swapper.acquire([new])
    assert hot.key in swapper.slot_of and cold.key not in swapper.slot_of
    swapper.release([new])
    swapper.acquire([hot])
    assert swapper.stats.hits == 1 and swapper.stats.misses == 3


def test_the_latest_write_back_is_evicted_last():
    """A page-in into a slot whose page-out is still leaving waits for it: the slots of the latest write-back batch
    go last, whatever their records' routing frequency."""
    store, swapper = _store_and_swapper(2)
    older, latest, new = store.records[(0, 0)], store.records[(0, 1)], store.records[(1, 0)]
    older.frequency, latest.frequency = 5.0, 1.0
    for rec in (older, latest):  # two write-back batches, ``latest``'s last
        swapper.acquire([rec])
        swapper.release([rec])
    swapper.acquire([new])
    assert latest.key in swapper.slot_of and older.key not in swapper.slot_of


def test_prefetch_reserves_and_acquire_hits():
    store, swapper = _store_and_swapper(2)
    a, b, c = store.records[(0, 0)], store.records[(0, 1)], store.records[(0, 2)]
    assert swapper.prefetch([a, b]) == 2
    assert swapper.prefetch([c]) == 0  # both slots are reserved for records about to be stepped
    swapper.acquire([a, b])
    assert swapper.stats.hits == 2 and swapper.stats.misses == 0


def test_slots_do_not_hold_in_use_records_hostage():
    store, swapper = _store_and_swapper(2)
    a, b, c = store.records[(0, 0)], store.records[(0, 1)], store.records[(0, 2)]
    swapper.prefetch([a, b])
    swapper.acquire([c])  # a needed record may take a merely prefetched slot
    assert c.key in swapper.slot_of


def test_lookahead_precision_recall_and_backward_prefetch():
    model = tiny_model(num_experts=16, layers=3)
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", gpu_slots=4))
    inputs: dict[int, torch.Tensor] = {}
    blocks = model.moe_blocks()
    for b in blocks:
        b.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod.layer_idx, args[0].detach()))
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids, labels=ids)
    hits = predicted = actual = 0
    for prev, nxt in zip(blocks[:-1], blocks[1:], strict=True):  # naive recomputation of the look-ahead
        x = inputs[prev.layer_idx].reshape(-1, 32)
        pred = set((x @ nxt.gate.weight.t()).topk(2, dim=-1).indices.flatten().tolist())
        used = set(out.routings[nxt.layer_idx].topk_idx.flatten().tolist())
        hits, predicted, actual = hits + len(pred & used), predicted + len(pred), actual + len(used)
    out.loss.backward()
    last = blocks[-1].layer_idx
    used_last = set(out.routings[last].topk_idx.flatten().tolist())
    cached = {k for k in opt.swapper.slot_of}
    assert opt.swapper.stats.prefetched > 0  # backward pages in from the forward's routing trace
    assert {e for (layer, e) in cached if layer == last} <= used_last
    assert all(key[1] in set(out.routings[key[0]].topk_idx.flatten().tolist()) for key in cached)
    opt.clip_grad_norm_(1.0)
    opt.step(1e-3)
    t = opt.telemetry()
    assert t["offload/lookahead_precision"] == hits / predicted
    assert t["offload/lookahead_recall"] == hits / actual
    assert t["offload/cache_hit_rate"] > 0
    opt.close()


def test_telemetry_bytes_follow_the_paging():
    """Bytes up = (misses + prefetches) x record, bytes down = stepped experts x record (write-through)."""
    from offload_harness import batches, train

    model = tiny_model(num_experts=16)
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", gpu_slots=2, prefetch=False))
    record = opt.store.max_padded * 4
    seen = []
    stats = []
    original = opt.swapper.reset_stats
    opt.swapper.reset_stats = lambda: stats.append(original()) or stats[-1]  # keep each step's counters
    train(model, opt, batches(steps=3), total=3, on_step=lambda _: seen.append(opt.telemetry()))
    for t, st in zip(seen, stats, strict=True):
        stepped = t["offload/experts_stepped_gpu"]
        assert st.misses > 0
        assert t["offload/d2h_bytes"] == stepped * record
        assert t["offload/h2d_bytes"] == (st.misses + st.prefetched) * record
        assert t["offload/cache_hit_rate"] == st.hits / (st.hits + st.misses)
        assert stepped == sum(t[f"offload/active_experts/layer{i}"] for i in (0, 1))
    opt.close()


def test_a_full_pool_skips_prefetch_scans_until_a_slot_may_free():
    """Once a prefetch finds no slot, later ones return at once (backward asks every layer of every micro-batch)
    until a release, an unreserve or an invalidation may have freed one; acquire never depends on it."""
    store, swapper = _store_and_swapper(2)
    a, b, c, d = (store.records[(0, e)] for e in range(4))
    assert swapper.prefetch([a, b, c]) == 2 and not swapper.can_prefetch()
    scans = []
    original = swapper._victims
    swapper._victims = lambda protect: scans.append(1) or original(protect)
    assert swapper.prefetch([c, d]) == 0 and scans == []
    swapper.acquire([a, b])
    swapper.release([a, b])
    assert swapper.can_prefetch()
    swapper.unreserve()
    assert swapper.prefetch([c]) == 1 and scans == [1] and c.key in swapper.slot_of
    swapper.acquire([d])  # a needed record takes a slot whatever the prefetch state
    assert d.key in swapper.slot_of


def test_lookahead_samples_the_first_micro_batch_of_a_step():
    """The look-ahead's kernels run in a step's first micro-batch only; its figures are that forward's."""
    model = tiny_model(num_experts=16, layers=3)
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", gpu_slots=4))
    ids = torch.randint(0, 64, (2, 8))
    totals = opt.engine.lookahead.totals
    for index in range(2):
        opt.begin_micro_batch(index, 2, 1e-3)
        before = totals.clone()
        model(ids, labels=ids).loss.backward()
        assert (totals != before).any() == (index == 0)
    opt.close()


def _victims_by_scanning_every_slot(swapper: Swapper, protect: set[int]) -> list[int]:
    """The slot order a page-in takes, computed the plain way: every slot visited (the reference of the skip list)."""
    empty, used = [], []
    for s, slot in enumerate(swapper.slots):
        if s in protect or slot.reserved or slot.state in (SlotState.IN_USE, SlotState.READING):
            continue
        if slot.key is None:
            empty.append(s)
        elif slot.key not in swapper.hot and not slot.dirty:
            used.append((slot.written == swapper.batches, swapper.store.records[slot.key].frequency, s))
    return empty + [s for *_, s in sorted(used)]


def test_victim_order_skips_hot_slots_as_a_scan_of_every_slot_would():
    store, swapper = _store_and_swapper(3)
    swapper.grow_hot_cache(3)
    recs = list(store)
    for step in range(6):  # routing that moves the hot set: records turn hot, cool, are paged in and invalidated
        for i, rec in enumerate(recs):
            rec.frequency = float((i * 7 + step * 3) % 11)
        swapper.revise_hot()
        assert swapper._victims(set()) == _victims_by_scanning_every_slot(swapper, set())
        for at in range(0, len(recs), 3):
            chunk = recs[at:at + 3]
            swapper.acquire(chunk)
            assert swapper._victims({0}) == _victims_by_scanning_every_slot(swapper, {0})
            swapper.release(chunk)
        swapper.settle([recs[step % len(recs)]])  # written back, then forgotten (as before a CPU-path step)
        assert swapper._victims(set()) == _victims_by_scanning_every_slot(swapper, set())
        swapper.flush()  # hot slots written back (a checkpoint): clean, and still not to be taken
        assert swapper._victims(set()) == _victims_by_scanning_every_slot(swapper, set())
    swapper.flush()


def test_a_slot_view_of_a_length_is_made_once():
    _, swapper = _store_and_swapper(1)
    slot = swapper.slots[0]
    assert slot.view(10) is slot.view(10) and slot.view(10).data_ptr() == slot.data.data_ptr()
    assert slot.view(12).numel() == 12
