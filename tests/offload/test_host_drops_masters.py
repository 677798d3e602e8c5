"""Host records without a master: with ``master: bf16_sr | fp32_split``, resident weights and ``step_on: gpu`` the
compute weights are the only copy of the master's bf16 segment, and a host-tier record holds what follows it
(moments, scales; ``fp32_split``'s low half). Qwen3-30B-A3B's state is then 2.03 B a parameter in host memory instead
of 4.03 (55 GiB instead of 109), which fits a 125 GiB host without an NVMe swap.

Each test runs the same training with host masters kept (``MOETRAIN_HOST_MASTERS=1``) and without, and asks for the
same bits: weights, exported masters and moments, a resumed run. Only where the bytes live differs.
"""

from __future__ import annotations

import pytest
import torch
from offload_harness import OPTIM, assert_same_training, batches, clone, tiny_model, train

from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig
from moetrain.offload.master_segment import HOST_ENV, host_drops_masters
from moetrain.offload.store import ExpertStore, Tier
from moetrain.offload.weight_masters import paged_from

STEPS = 6


@pytest.fixture(scope="module")
def base():
    return tiny_model(), batches(steps=STEPS)


@pytest.fixture(params=["bf16_sr", "fp32_split"])
def master(request):
    return request.param


def _cfg(master: str, **offload) -> OffloadConfig:
    return OffloadConfig(tier="cpu", master=master, moments="int8", quant_block=16, gpu_slots=3, **offload)


def _train(base, monkeypatch, *, keep: bool, cfg: OffloadConfig, steps: int = STEPS):
    model0, data = base
    monkeypatch.setenv(HOST_ENV, "1" if keep else "0")
    model = clone(model0)
    opt = build_optimizer(model, OPTIM, cfg)
    train(model, opt, data[:steps * 2], total=STEPS)  # batches() gives two micro-batches a step
    return model, opt


def test_only_the_gpu_step_path_with_resident_weights_drops_them():
    assert host_drops_masters("bf16_sr", "yes", "gpu") and host_drops_masters("fp32_split", "yes", "gpu")
    assert not host_drops_masters("fp32", "yes", "gpu")  # the weights hold a rounding of an fp32 master
    assert not host_drops_masters("bf16_kahan", "yes", "gpu")
    assert not host_drops_masters("bf16_sr", "no", "gpu")  # paged weights: the host copy is all there is
    assert not host_drops_masters("bf16_sr", "yes", "auto")  # the CPU share steps the master in host memory
    assert not host_drops_masters("bf16_sr", "yes", "cpu")


def test_host_holds_the_rest_of_each_record_and_the_weights_the_master(monkeypatch, master):
    model = tiny_model()
    monkeypatch.setenv(HOST_ENV, "1")
    whole = ExpertStore(clone(model), _cfg(master))
    monkeypatch.setenv(HOST_ENV, "0")
    store = ExpertStore(model, _cfg(master))
    assert store.drops_masters and not whole.drops_masters
    skips = {rec.host_skip for rec in store}
    assert skips == {paged_from(next(iter(store)))} and 0 not in skips
    assert store.cpu_bytes == whole.cpu_bytes - 4 * sum(rec.host_skip for rec in store)
    def bits(t: torch.Tensor) -> torch.Tensor:  # the bytes as they are (packed codes read as fp32 may be NaN)
        return t.view(torch.int32)

    for rec in store:
        ref = whole.records[rec.key]
        assert torch.equal(bits(store.host_tail(rec, rec.host_skip)), bits(whole.host_view(ref)[rec.host_skip:]))
        assert torch.equal(bits(store.whole_state(rec)), bits(whole.host_view(ref))), rec.key  # the weights
        with pytest.raises(AssertionError, match="weights only"):
            store.host_view(rec)
    store.close()
    whole.close()


def test_training_saving_and_resuming_give_the_same_bits(base, monkeypatch, master):
    hot = _cfg(master, hot_cache_gb=0.001)  # a hot cache too: its dirty slots are written back by a flush
    kept = _train(base, monkeypatch, keep=True, cfg=hot)
    dropped = _train(base, monkeypatch, keep=False, cfg=hot)
    assert dropped[1].engine.swapper.hot_capacity > 0 and dropped[1].engine.swapper.hot
    assert dropped[1].engine.store.drops_masters and not dropped[1].engine.swapper.stale_masters
    assert_same_training(dropped, kept)
    # resume: a checkpoint of half the steps loaded into a fresh engine (masters into the weights, the rest into
    # the slab), then the other half
    half_model, half = _train(base, monkeypatch, keep=False, cfg=_cfg(master), steps=STEPS // 2)
    state = half.state_dict()
    half.close()
    resumed = clone(half_model)
    with torch.no_grad():  # the load must write the weights: start them from garbage
        for rec in dropped[1].engine.store:
            for p in resumed.get_submodule(rec.prefix).parameters():
                p.fill_(3.0)
    opt = build_optimizer(resumed, OPTIM, _cfg(master))
    opt.load_state_dict(state)
    _, data = base
    train(resumed, opt, data[STEPS // 2 * 2:STEPS * 2], total=STEPS, start=STEPS // 2)
    assert_same_training((resumed, opt), kept)
    for o in (kept[1], dropped[1], opt):
        o.close()


def test_records_past_the_host_budget_stay_whole_on_nvme(base, monkeypatch, tmp_path, master):
    sizing = ExpertStore(tiny_model(), _cfg(master))
    record = sizing.max_padded * 4
    sizing.close()
    cfg = _cfg(master, nvme_path=str(tmp_path), cpu_budget_gb=9 * record / 2**30)
    kept = _train(base, monkeypatch, keep=True, cfg=cfg)
    dropped = _train(base, monkeypatch, keep=False, cfg=cfg)
    store = dropped[1].engine.store
    on_host = [r for r in store if r.tier is Tier.CPU]
    assert len([r for r in kept[1].engine.store if r.tier is Tier.CPU]) == 9 < len(on_host)  # more records fit
    assert all(r.host_skip for r in on_host) and all(not r.host_skip for r in store if r.tier is Tier.NVME)
    assert any(r.tier is Tier.NVME for r in store)
    assert_same_training(dropped, kept)
    for o in (kept[1], dropped[1]):
        o.close()
