"""The planner sizes the automatic hot-expert cache (``hot_cache_gb: null``) as the engine does after step 1
(``ExpertEngine._auto_hot_cache``): the GPU's memory less step 1's peak (the planned GPU rows before the cache,
less the dense AdamW moments torch creates only in the first optimizer step), less a margin of 10% of the GPU
plus 1 GiB; an explicit ``hot_cache_gb`` is taken as given."""

from __future__ import annotations

import math

import pytest
from offload_harness import tiny_model

from moetrain.config import ModelConfig
from moetrain.offload.config import OffloadConfig
from moetrain.offload.nvme import align_up
from moetrain.offload.plan import count_parameters, dense_group_params, make_plan

GiB = 2**30


def capacity_leaving(room: int, *, used: int, moments: int) -> int:
    """The smallest GPU (bytes) whose automatic hot cache gets ``room`` bytes, where the GPU rows planned before
    the cache take ``used`` bytes of which ``moments`` are the dense AdamW moments:
    C - (used - moments) - (0.10 C + 1 GiB) >= room."""
    return -(-10 * (used - moments + GiB + room) // 9)


def test_hot_cache_auto_takes_what_is_left_less_the_engines_margin_and_a_number_is_checked():
    model = tiny_model(num_experts=16)
    dense, _, per_expert = count_parameters(model.config)
    record = align_up(12 * per_expert)
    moments = 8 * dense  # every dense parameter trains: two fp32 moments each
    off = make_plan(model.config, OffloadConfig(tier="cpu", hot_cache_gb=0), tokens_per_step=8)
    capacity = capacity_leaving(5 * record + record // 2, used=off.gpu_bytes, moments=moments)  # 5 records and a half
    auto = make_plan(model.config, OffloadConfig(tier="cpu", hot_cache_gb=None), tokens_per_step=8,
                     gpu_capacity=capacity)
    assert auto.hot_cache_experts == 5 and auto.gpu_bytes == off.gpu_bytes + 5 * record
    # the engine's margin stays free, but for the dense moments it takes in
    assert capacity - auto.gpu_bytes >= 0.10 * capacity + GiB - moments
    assert auto.fits()["gpu"] is True and "5 of 32 experts" in auto.format()
    assert "auto: what the GPU has left less 10% + 1 GiB" in auto.format()
    # one record less of room: one record less in the cache
    fewer = make_plan(model.config, OffloadConfig(tier="cpu", hot_cache_gb=None), tokens_per_step=8,
                      gpu_capacity=capacity_leaving(4 * record + record // 2, used=off.gpu_bytes, moments=moments))
    assert fewer.hot_cache_experts == 4
    # what used to be room for 5 records (the margin ignored) now leaves none
    bare = make_plan(model.config, OffloadConfig(tier="cpu", hot_cache_gb=None), tokens_per_step=8,
                     gpu_capacity=off.gpu_bytes + 5 * record + record // 2)
    assert bare.hot_cache_experts == 0 and bare.gpu_bytes == off.gpu_bytes
    # the cached experts are not paged: uniform routing leaves 27/32 of the active ones to move
    assert auto.moved_bytes == pytest.approx(off.moved_bytes * (32 - 5) / 32)
    fixed = make_plan(model.config, OffloadConfig(tier="cpu", hot_cache_gb=3 * record / GiB), tokens_per_step=8,
                      gpu_capacity=off.gpu_bytes + 2 * record)
    assert fixed.hot_cache_experts == 3 and fixed.fits()["gpu"] is False  # 3 records do not fit in room for 2
    everything = make_plan(model.config, OffloadConfig(tier="cpu", hot_cache_gb=None), tokens_per_step=8,
                           gpu_capacity=1 << 40)
    assert everything.hot_cache_experts == 32 and everything.moved_bytes == 0
    unknown = make_plan(model.config, OffloadConfig(tier="cpu", hot_cache_gb=None), tokens_per_step=8)
    if unknown.gpu_capacity is None:
        assert unknown.hot_cache_experts == 0 and "capacity unknown here" in unknown.format()


def test_an_auto_hot_cache_holds_no_master_where_the_step_reads_it_from_the_weights():
    """bf16_sr with resident weights and idle_experts skip: the engine's hot cache, sized after step 1, holds each
    record less its master segment (moetrain.offload.weight_masters.step_reads_weights); with the catch-up of
    idle_experts dense it keeps whole records."""
    model = tiny_model(num_experts=16)
    dense_params, _, per_expert = count_parameters(model.config)
    plans = {}
    for idle in ("skip", "dense"):
        off = OffloadConfig(tier="cpu", hot_cache_gb=None, master="bf16_sr", moments="int8", quant_block=16,
                            idle_experts=idle)
        used = make_plan(model.config, OffloadConfig(tier="cpu", hot_cache_gb=0, master="bf16_sr", moments="int8",
                                                     quant_block=16), tokens_per_step=8).gpu_bytes
        capacity = capacity_leaving(6 * align_up(4 * per_expert), used=used, moments=8 * dense_params)
        plans[idle] = make_plan(model.config, off, tokens_per_step=8, gpu_capacity=capacity)
    skip, dense = plans["skip"], plans["dense"]
    assert dense.hot_record_bytes == dense.record_bytes
    assert skip.hot_record_bytes == skip.record_bytes - align_up(2 * per_expert, 64)
    assert skip.hot_cache_experts > dense.hot_cache_experts > 0
    assert skip.moved_bytes < dense.moved_bytes


@pytest.mark.parametrize("frozen, trained_experts, gpu_gb", [
    ((), None, 139.8),  # every dense parameter trains
    (("embeddings", "lm_head"), None, 139.8),  # frozen groups have no moments: only the trained ones' are taken off
    ((), 1000, 139.8),  # fewer trained experts: fewer gradients, a larger cache, still under the cap
    ((), 300, 139.8),  # capped at the trained experts
    ((), None, 100.0),  # little room: none
])
def test_the_auto_hot_cache_is_the_engines_rule(frozen, trained_experts, gpu_gb):
    """Hot slots = floor((capacity - (GPU rows before the cache - dense AdamW moments) - (0.10 capacity + 1 GiB))
    / hot slot bytes), at most the trained experts, on DeepSeek-MoE-16B's shape, whose dense moments (8 B per
    trained dense parameter, 10.6 GiB with all of them training) are a few hundred slots."""
    config = ModelConfig.from_preset("deepseek-moe-16b")
    dense, _, _ = count_parameters(config)
    trained_dense = dense - sum(dense_group_params(config)[g] for g in frozen)
    moments = 8 * trained_dense
    capacity = int(gpu_gb * GiB)
    kwargs = dict(tokens_per_step=8192, gpu_capacity=capacity, host_capacity=1 << 40, frozen_groups=frozen,
                  trained_experts=trained_experts)
    off = OffloadConfig(tier="cpu", master="fp32_split", moments="int8", hot_cache_gb=None)
    auto = make_plan(config, off, **kwargs)
    rows = [n for tier, what, n in auto.breakdown if tier == "gpu" and not what.startswith("hot-expert")]
    used = sum(rows)
    assert auto.gpu_bytes == used + auto.hot_cache_experts * auto.hot_record_bytes  # the cache is the last GPU row
    if trained_dense:  # the moments are in the dense row: 4 B weight + 4 B grad + 2 x 4 B moments
        assert ("gpu", "dense weights, grads, AdamW moments (fp32)", 16 * trained_dense) in auto.breakdown
    trained = 1728 if trained_experts is None else trained_experts
    spare = capacity - (used - moments) - (0.10 * capacity + GiB)
    expected = min(trained, max(0, math.floor(spare / auto.hot_record_bytes)))
    assert auto.hot_cache_experts == expected
    if trained_experts == 300:
        assert expected == 300
    elif gpu_gb == 100.0:
        assert expected == 0
    else:
        assert 0 < expected < trained
    # an explicit hot_cache_gb is taken as given, whatever the room
    fixed = make_plan(config, OffloadConfig(tier="cpu", master="fp32_split", moments="int8", hot_cache_gb=2.0),
                      **kwargs)
    assert fixed.hot_cache_experts == min(trained, int(2.0 * GiB) // fixed.hot_record_bytes)
