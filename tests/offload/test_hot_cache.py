"""The hot-expert state cache: frequently routed experts keep their state on the device between steps.

Exactness is unchanged (torch.optim.AdamW is the reference), the cached experts cost no page-in or
page-out while they stay hot, and checkpoint reads see their latest state.
"""

from __future__ import annotations

import pytest
import torch
from offload_harness import OPTIM, batches, clone, max_diff, tiny_model, train

from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig
from moetrain.offload.nvme import align_up
from moetrain.offload.slots import HOT_STAY, pick_hot
from moetrain.optim import DenseAdamW

RECORD_BYTES = align_up(3 * (3 * 32 * 16) * 4)  # one tiny expert: 3 matrices of 32 x 16, fp32 master + 2 moments


@pytest.fixture(scope="module")
def setup():
    base, data = tiny_model(), batches(steps=12, tokens=16)
    ref = clone(base)
    train(ref, DenseAdamW(ref, OPTIM), data, total=12)
    return base, data, ref


def run(base, data, **offload):
    model = clone(base)
    opt = build_optimizer(model, OPTIM, OffloadConfig(**offload))
    seen: list[dict[str, float]] = []
    train(model, opt, data, total=12, on_step=lambda _: seen.append(opt.telemetry()))
    return model, opt, seen


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_hot_cache_is_exact_and_saves_transfers(setup, tmp_path, tier):
    base, data, ref = setup
    nvme = str(tmp_path) if tier == "nvme" else None
    cold, opt_cold, seen_cold = run(base, data, tier=tier, nvme_path=nvme, gpu_slots=4)
    opt_cold.finalize()
    hot, opt_hot, seen_hot = run(base, data, tier=tier, nvme_path=nvme, gpu_slots=4,
                                 hot_cache_gb=8 * RECORD_BYTES / 2**30)
    assert opt_hot.swapper.hot_capacity == 8
    assert max(t["offload/hot_experts"] for t in seen_hot) == 8
    # mid-run reads (a checkpoint) see the hot experts' current state: their master equals the weights
    names = dict(hot.named_parameters())
    for name, master in opt_hot.named_master_tensors():
        assert torch.equal(master, names[name].detach()), name
    opt_hot.finalize()
    assert max_diff(hot, ref) <= 1e-6
    assert max_diff(cold, ref) <= 1e-6
    moved_cold = sum(t["offload/h2d_bytes"] + t["offload/d2h_bytes"] for t in seen_cold[1:])
    moved_hot = sum(t["offload/h2d_bytes"] + t["offload/d2h_bytes"] for t in seen_hot[1:])
    assert moved_hot < 0.8 * moved_cold, (moved_hot, moved_cold)
    opt_cold.close()
    opt_hot.close()


def test_auto_sized_hot_cache_after_the_first_step(setup):
    base, data, ref = setup
    model, opt, seen = run(base, data, tier="cpu", gpu_slots=4, hot_cache_gb=None)
    assert seen[0]["offload/hot_experts"] == 0  # sized at the end of the first step
    assert seen[-1]["offload/hot_cache_slots"] == 32 - 4  # host memory holds every record here
    assert seen[-1]["offload/hot_experts"] > 4
    opt.finalize()
    assert max_diff(model, ref) <= 1e-6
    opt.close()


def test_hot_experts_stepped_on_the_cpu_path_are_written_back_first(setup):
    base, data, ref = setup
    cold, opt_cold, _ = run(base, data, tier="cpu", gpu_slots=4, step_on="cpu")
    opt_cold.finalize()
    model, opt, seen = run(base, data, tier="cpu", gpu_slots=4, step_on="cpu", hot_cache_gb=8 * RECORD_BYTES / 2**30)
    opt.finalize()
    assert sum(t["offload/experts_stepped_gpu"] for t in seen) > 0  # hot experts stepped where they are
    # the CPU share's AdamW (the CUDA kernel's order) rounds unlike torch's CPU loop: the cache must not add to that
    assert max_diff(model, ref) <= 1.5 * max_diff(cold, ref) + 1e-6 <= 1e-4
    opt.close()
    opt_cold.close()


def test_hot_records_stay_until_another_is_clearly_more_frequent():
    freq = {(0, e): 100.0 + e for e in range(6)}  # (0, 4) and (0, 5) most frequent
    assert pick_hot(freq, set(), 2) == {(0, 4), (0, 5)}
    hot = {(0, 0), (0, 1)}
    assert pick_hot(freq, hot, 2) == hot  # jitter of a few percent moves nothing (no write-back)
    freq[(0, 5)] = 101.0 * HOT_STAY + 1  # now clearly above (0, 1) and (0, 0): takes the coldest hot one's place
    assert pick_hot(freq, hot, 2) == {(0, 1), (0, 5)}
    freq[(0, 1)] = 0.0  # not routed lately: never hot, whatever its place; (0, 0) keeps its margin over (0, 4)
    assert pick_hot(freq, hot, 2) == {(0, 0), (0, 5)}
    assert pick_hot(freq, hot, 10) == {k for k, f in freq.items() if f > 0}
