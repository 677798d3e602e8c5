"""``master: bf16_sr | fp32_split`` with resident weights: the compute weights hold the master's bf16 segment, and
only the rest of a record is paged (moments; under ``fp32_split`` also the master's low half).

Each test trains the same model twice through the engine, once paging whole records
(``MOETRAIN_MASTER_FROM_WEIGHTS=0``) and once paging moments only, and asks for the same bits: weights, exported
masters and moments. The stochastic rounding is seeded per record and step, so the two runs are literally the same
computation; only the bytes moved differ.
"""

from __future__ import annotations

import pytest
import torch
from offload_harness import OPTIM, assert_same_training, batches, clone, tiny_model, train

from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig
from moetrain.offload.master_segment import ENV, HOST_ENV
from moetrain.offload.optim import build_offload_optimizer
from moetrain.offload.rates import Rates
from moetrain.offload.store import Tier
from moetrain.offload.weight_masters import paged_from

STEPS = 8


@pytest.fixture(scope="module")
def base():
    return tiny_model(), batches(steps=STEPS)


@pytest.fixture(params=["bf16_sr", "fp32_split"])
def master(request):
    return request.param


def _train(base, monkeypatch, on: bool, master: str, **offload):
    """(model, optimizer, bytes paged in, bytes paged out over every step) of one run; the optimizer is left
    open, not flushed, for the test to look at its host state."""
    model0, data = base
    monkeypatch.setenv(ENV, "1" if on else "0")
    model = clone(model0)
    rates = offload.pop("rates", None)
    cfg = OffloadConfig(tier="cpu", master=master, moments="int8", quant_block=16, **offload)
    opt = (build_optimizer(model, OPTIM, cfg) if rates is None else
           build_offload_optimizer(model, OPTIM, cfg, rates=rates))
    # step_on auto: the cost model's split on every step (its timed trial against all-GPU steps would pick by the
    # machine's timing, and the two paths round differently: the runs compared must take the same one)
    opt.engine.auto.enabled = False
    moved = [0, 0]
    swapper = opt.engine.swapper
    reset = swapper.reset_stats

    def counting_reset():
        moved[0] += swapper.stats.h2d_bytes
        moved[1] += swapper.stats.d2h_bytes
        return reset()

    swapper.reset_stats = counting_reset
    steps = opt.telemetry_steps = []  # every step's figures
    train(model, opt, data, total=STEPS, on_step=lambda _: steps.append(opt.telemetry()))
    return model, opt, moved


def test_moments_only_cross_the_link_and_nothing_changes(base, monkeypatch, master):
    whole_model, whole, whole_moved = _train(base, monkeypatch, on=False, master=master, gpu_slots=3)
    model, opt, moved = _train(base, monkeypatch, on=True, master=master, gpu_slots=3)
    assert opt.engine.swapper.masters_from_weights and not whole.engine.swapper.masters_from_weights
    rec = next(iter(opt.engine.store))
    share = 1 - paged_from(rec) / rec.padded  # of a record's bytes: (rest,) moments and scales (and padding)
    assert 0.3 < share < 0.7 if master == "bf16_sr" else 0.6 < share <= 0.8  # fp32_split: rest too
    assert whole_moved[0] > 0 and moved[0] == pytest.approx(share * whole_moved[0], rel=1e-9)
    # page-outs: the same share (the flush's masters come at export, after these counts)
    assert moved[1] == pytest.approx(share * whole_moved[1], rel=1e-9)
    assert_same_training((model, opt), (whole_model, whole))
    for o in (opt, whole):
        o.close()


def test_host_master_is_stale_until_a_flush_writes_the_weights(base, monkeypatch, master):
    monkeypatch.setenv(HOST_ENV, "1")  # keep host masters (test_host_drops_masters: without them)
    model, opt, _ = _train(base, monkeypatch, on=True, master=master, gpu_slots=3)
    swapper, store = opt.engine.swapper, opt.engine.store

    def host_master_equals_weights(rec) -> bool:
        views = rec.split(rec.layout.views(store.host_view(rec))["master"])
        return all(torch.equal(v.float(), p.detach().float()) for v, p in zip(views, rec.params, strict=True))

    stale = list(swapper.stale_masters.values())
    assert stale, "a step must leave paged records' host masters behind the weights"
    assert not all(host_master_equals_weights(r) for r in stale), "the weights moved on: the host copy is old"
    swapper.flush()
    assert not swapper.stale_masters
    assert all(host_master_equals_weights(r) for r in store if r.tier is Tier.CPU)
    opt.close()


def test_cpu_share_reads_a_current_master(base, monkeypatch, master):
    """``step_on: auto`` splits each layer: records paged out by the GPU share and stepped later in host memory by
    the CPU share must find their master there (settle writes it first)."""
    rates = Rates(h2d_gbps=12.0, d2h_gbps=12.0, cpu_adam_gparams=1.0, measured=True)
    runs = [_train(base, monkeypatch, on=on, master=master, gpu_slots=4, step_on="auto", rates=rates)
            for on in (False, True)]
    seen = runs[1][1].telemetry_steps
    assert sum(t["offload/experts_stepped_cpu"] for t in seen) > 0
    assert sum(t["offload/experts_stepped_gpu"] for t in seen) > 0
    assert_same_training(runs[1][:2], runs[0][:2])
    for _, o, _ in runs:
        o.close()


def test_a_resumed_run_continues_the_same(base, monkeypatch, master):
    """Save after half the steps (the weights become the host masters), load into a fresh engine, and train on:
    the same bits as one run paging whole records."""
    model0, data = base
    monkeypatch.setenv(ENV, "1")
    cfg = OffloadConfig(tier="cpu", master=master, moments="int8", quant_block=16, gpu_slots=3)
    first = clone(model0)
    opt = build_optimizer(first, OPTIM, cfg)
    train(first, opt, data[:STEPS // 2 * 2], total=STEPS)  # batches() gives ACCUM micro-batches a step
    state = opt.state_dict()
    resumed = clone(first)
    opt2 = build_optimizer(resumed, OPTIM, cfg)
    opt2.load_state_dict(state)
    opt.close()
    train(resumed, opt2, data[STEPS // 2 * 2:], total=STEPS, start=STEPS // 2)
    whole_model, whole, _ = _train(base, monkeypatch, on=False, master=master, gpu_slots=3)
    assert_same_training((resumed, opt2), (whole_model, whole))
    for o in (opt2, whole):
        o.close()
