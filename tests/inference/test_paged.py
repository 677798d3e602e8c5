"""Paged inference equals resident inference, for every family's tiny preset, with a cache smaller than the
experts: greedy tokens identical (through the KV cache), losses of a padded batch equal (fp32), for LRU and
LFU; int8 experts equal a resident model holding the same dequantized weights; experts read from the shards
(per expert or fused) equal the host rows; the grouped path over the slot buffer equals the loop; the ideal static
hit rate equals a brute-force search; LFU reaches the ideal static cache on a stationary routing trace."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch

import moetrain
from moetrain.config import ModelConfig
from moetrain.generate import generate
from moetrain.inference import ExpertCache, HostExpertStore, ideal_static_hit_rate, paged_cache
from moetrain.inference.store import ShardExpertStore, dequantize_int8, quantize_int8
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf import export_hf

REPO = Path(__file__).resolve().parents[2]
TINY_PRESETS = sorted(p.stem for p in (REPO / "configs" / "models").glob("tiny-*.yaml"))


def _exported(preset: str, randomize, path: Path) -> Path:
    model = randomize(MoEForCausalLM(ModelConfig.from_preset(preset)))
    with torch.no_grad():
        for block in model.moe_blocks():
            if block.gate.e_score_correction_bias is not None:  # a bias that changes DeepSeek-V3's choices
                block.gate.e_score_correction_bias.normal_(0.0, 0.3)
    export_hf(model, path, max_shard_bytes=200_000)
    return path


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (3, 16))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_every_family_has_a_tiny_preset():
    families = {ModelConfig.from_preset(p).family for p in TINY_PRESETS}
    assert families >= {"deepseek_moe", "deepseek_v2", "deepseek_v3", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"}


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_paged_equals_resident(preset, policy, randomize, tmp_path):
    path = _exported(preset, randomize, tmp_path / "hf")
    resident = moetrain.from_pretrained(path)
    total = len(resident.moe_blocks()) * resident.config.num_experts
    slots = max(2, total // 3)  # a third of the experts fit: pages, evicts and stages
    paged = moetrain.from_pretrained(path, expert_weights="paged", cache_slots=slots, cache_policy=policy)
    cache = paged_cache(paged)
    assert cache.num_slots == slots < total
    assert not any(".mlp.experts." in name for name in paged.state_dict())  # nothing of the experts on the model

    prompt = torch.randint(0, resident.config.vocab_size, (1, 9))
    expected = generate(resident, prompt, max_new_tokens=12)
    assert generate(paged, prompt, max_new_tokens=12).tolist() == expected.tolist()
    stats = cache.stats
    assert stats.misses > 0 and stats.evictions + stats.prefetched > 0 and stats.bytes_paged > 0

    batch = _batch(resident.config.vocab_size)
    with torch.no_grad():
        want, got = resident(**batch), paged(**batch)
    assert torch.allclose(got.loss, want.loss, rtol=0, atol=1e-6)
    assert torch.equal(got.logits, want.logits)  # the same ops in the same order: equal, not merely close


def test_prefetch_pages_the_next_layer_under_the_current_one(randomize, tmp_path):
    path = _exported("tiny-deepseek-moe", randomize, tmp_path / "hf")
    paged = moetrain.from_pretrained(path, expert_weights="paged", cache_slots=40, cache_policy="lru")
    generate(paged, torch.randint(0, 4096, (1, 4)), max_new_tokens=8)
    stats = paged_cache(paged).stats
    assert stats.prefetched > 0 and 0 < stats.prefetch_hits <= stats.prefetched
    off = moetrain.from_pretrained(path, expert_weights="paged", cache_slots=40, cache_policy="lru", prefetch=False)
    generate(off, torch.randint(0, 4096, (1, 4)), max_new_tokens=8)
    assert paged_cache(off).stats.prefetched == 0


def test_int8_experts_equal_a_resident_model_of_the_dequantized_weights(randomize, tmp_path):
    path = _exported("tiny-qwen3-moe", randomize, tmp_path / "hf")
    reference = moetrain.from_pretrained(path)
    with torch.no_grad():
        for block in reference.moe_blocks():
            for expert in block.experts:
                for linear in (expert.gate_proj, expert.up_proj, expert.down_proj):
                    linear.weight.copy_(dequantize_int8(*quantize_int8(linear.weight), torch.float32))
    paged = moetrain.from_pretrained(path, expert_weights="paged", cache_slots=5, expert_dtype="int8")
    store = paged_cache(paged).store
    assert store.row_bytes * 4 < 1.1 * store.row_numel * 4  # int8 rows: a quarter of fp32, scales aside
    prompt = torch.randint(0, 256, (1, 7))
    assert generate(paged, prompt, max_new_tokens=10).tolist() == generate(reference, prompt,
                                                                           max_new_tokens=10).tolist()
    batch = _batch(256)
    with torch.no_grad():
        assert torch.allclose(paged(**batch).loss, reference(**batch).loss, rtol=0, atol=1e-6)


def test_ideal_static_hit_rate_equals_brute_force():
    rng = random.Random(0)
    keys = [(layer, e) for layer in range(2) for e in range(3)]
    trace = [rng.choice(keys[:2] * 3 + keys) for _ in range(40)]
    for slots in range(len(keys) + 1):
        best = max(sum(k in chosen for k in trace) for chosen in map(set, itertools.combinations(keys, slots)))
        assert ideal_static_hit_rate(trace, slots) == pytest.approx(best / len(trace))
    assert ideal_static_hit_rate([], 3) == 0.0


def _replay(policy: str, trace: list[tuple[int, int]], slots: int, staging: int | None = None) -> ExpertCache:
    store = HostExpertStore([0, 1], 16, 4, 4, dtype=torch.float32)
    for rows in store.rows.values():
        rows.zero_()
    cache = ExpertCache(store, slots, torch.device("cpu"), policy=policy, staging_slots=staging)
    for layer, expert in trace:
        cache.release(cache.acquire(layer, [expert]))
    return cache


def test_lfu_reaches_the_ideal_static_cache_on_a_stationary_trace():
    """Zipf-distributed routing over 32 experts, 12 slots: LFU (with admission) keeps the most frequent experts;
    LRU, measured beside it, churns."""
    rng = random.Random(1)
    keys = [(layer, e) for layer in range(2) for e in range(16)]
    rng.shuffle(keys)
    weights = [1.0 / (rank + 1) for rank in range(len(keys))]
    trace = rng.choices(keys, weights=weights, k=4000)
    ideal = ideal_static_hit_rate(trace, 12)
    lfu, lru = _replay("lfu", trace, 12), _replay("lru", trace, 12)
    assert lfu.stats.demands == lru.stats.demands == len(trace)
    assert lfu.stats.hit_rate >= 0.95 * ideal
    assert lru.stats.hit_rate < lfu.stats.hit_rate


def test_lru_evicts_the_least_recently_used_and_lfu_the_least_frequent():
    trace = [(0, 0), (0, 1), (0, 1), (0, 2), (0, 0), (0, 3)]
    lru = _replay("lru", trace, 3, staging=0)
    assert set(lru.slot_of) == {(0, 0), (0, 2), (0, 3)} and lru.stats.hits == 2
    lfu = _replay("lfu", trace + [(0, 3)], 3, staging=0)
    assert set(lfu.slot_of) == {(0, 0), (0, 1), (0, 3)}  # (0, 2): once, and the least recently of the ones


def _run_layer(cache: ExpertCache, layer: int, experts: list[int]) -> list[list[int]]:
    """The groups in which :class:`PagedExperts` computes ``layer``'s ``experts`` (acquire, compute, release)."""
    groups: list[list[int]] = []
    done: list[int] = []
    todo = list(experts)
    while todo:
        got = cache.acquire(layer, todo, done=done)
        groups.append(got.experts)
        cache.release(got)
        done += got.experts
        todo = [e for e in todo if e not in got.experts]
    return groups


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_a_layer_routing_more_experts_than_slots_keeps_what_fits(policy):
    """Three layers each routing 12 of 16 experts through 8 slots (6 main, 2 staging), call after call (a
    validation loop): each layer runs in groups, the cache keeps the main slots' experts from one call to the next
    (the experts of a layer's own call are never evicted for its later groups, and LRU lets no such scan evict the
    other layers'), so every call after the first hits them; the groups compute every expert exactly once."""
    store = HostExpertStore([0, 1, 2], 16, 4, 4, dtype=torch.float32)
    cache = ExpertCache(store, 8, torch.device("cpu"), policy=policy, staging_slots=2)
    routed = {layer: list(range(layer, layer + 12)) for layer in range(3)}
    for call in range(4):
        cache.reset_stats()
        for layer, experts in routed.items():
            groups = _run_layer(cache, layer, experts)
            assert sorted(e for g in groups for e in g) == experts and len(groups) > 1
        assert cache.stats.demands == 36
        assert cache.stats.hits == (0 if call == 0 else cache.main_slots)
        assert cache.stats.hits <= ideal_static_hit_rate(cache.trace, cache.num_slots) * 36
    kept = {key for key, slot in cache.slot_of.items() if slot < cache.main_slots}
    assert len(kept) == cache.main_slots


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_a_cache_smaller_than_a_layer_s_experts_hits_on_repeated_calls(policy, randomize, tmp_path):
    """The model: a batch routes more experts per layer than the cache has slots; repeated calls equal the resident
    model's logits exactly and, after the first, hit the experts the cache kept (it used to end each call holding
    only the last layer's last group: no hit at all)."""
    path = _exported("tiny-deepseek-moe", randomize, tmp_path / "hf")
    resident = moetrain.from_pretrained(path)
    paged = moetrain.from_pretrained(path, expert_weights="paged", cache_slots=8, cache_policy=policy)
    cache = paged_cache(paged)
    ids = torch.randint(0, resident.config.vocab_size, (2, 32))
    with torch.no_grad():
        want = resident(ids).logits
        for call in range(3):
            cache.reset_stats()
            assert torch.equal(paged(ids).logits, want)
            assert max(len(b.experts.last_routed) for b in paged.moe_blocks()) > cache.num_slots
            assert cache.stats.hits >= (cache.main_slots if call else 0)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_experts_read_from_the_shards_equal_the_host_rows(preset, randomize, tmp_path):
    """``expert_source="shards"``: no expert row in host memory, every miss read from the memory-mapped shards;
    tokens and logits equal the host-memory source's (and so the resident model's)."""
    path = _exported(preset, randomize, tmp_path / "hf")
    host = moetrain.from_pretrained(path, expert_weights="paged", cache_slots=4)
    shards = moetrain.from_pretrained(path, expert_weights="paged", cache_slots=4, expert_source="shards")
    store = paged_cache(shards).store
    assert isinstance(store, ShardExpertStore) and all(rows.numel() == 0 for rows in store.rows.values())
    prompt = torch.randint(0, host.config.vocab_size, (1, 6))
    assert generate(shards, prompt, max_new_tokens=8).tolist() == generate(host, prompt, max_new_tokens=8).tolist()
    batch = _batch(host.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(shards(**batch).logits, host(**batch).logits)
    assert store.reads == paged_cache(shards).stats.bytes_paged // store.row_bytes > 0  # one read per copy


def _fused(path: Path, out: Path) -> Path:
    """``path``'s checkpoint rewritten with each layer's experts fused (transformers-5's layout): one
    ``gate_up_proj`` (E, 2I, H) and one ``down_proj`` (E, H, I) per layer, in one file."""
    from safetensors.torch import save_file

    from moetrain.shards import iter_sharded

    tensors = dict(iter_sharded(path))
    fused: dict[str, torch.Tensor] = {}
    for layer in sorted({int(n.split(".")[2]) for n in tensors if ".mlp.experts." in n}):
        prefix = f"model.layers.{layer}.mlp.experts"
        count = len({n for n in tensors if n.startswith(prefix + ".") and n.endswith(".gate_proj.weight")})
        pop = [[tensors.pop(f"{prefix}.{e}.{p}.weight") for e in range(count)] for p in ("gate_proj", "up_proj",
                                                                                          "down_proj")]
        fused[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(pop[0], pop[1],
                                                                                         strict=True)])
        fused[f"{prefix}.down_proj"] = torch.stack(pop[2])
    out.mkdir()
    save_file({**tensors, **fused}, str(out / "model.safetensors"))
    (out / "config.json").write_text((path / "config.json").read_text())
    return out


def test_shards_of_fused_experts_are_sliced_per_expert(randomize, tmp_path):
    path = _exported("tiny-qwen3-moe", randomize, tmp_path / "hf")
    fused = _fused(path, tmp_path / "fused")
    host = moetrain.from_pretrained(path, expert_weights="paged", cache_slots=5)
    shards = moetrain.from_pretrained(fused, expert_weights="paged", cache_slots=5, expert_source="shards")
    assert any(fuse is not None for _, _, fuse in paged_cache(shards).store.location.values())
    batch = _batch(host.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(shards(**batch).logits, host(**batch).logits)


@pytest.mark.parametrize("expert_dtype", ["auto", "int8"])
def test_grouped_path_over_the_slot_buffer_equals_the_loop(expert_dtype, randomize, tmp_path, monkeypatch):
    """The grouped path's bookkeeping (rows permuted into slot order, one group per slot, int8 slots gathered and
    dequantized, a layer split into groups by a small cache) on the CPU, where ``torch._grouped_mm`` runs in
    fp32: equal to the loop up to fp32 summation order (tests/gpu holds the CUDA kernel to it in bf16)."""
    import moetrain.inference.paged as paged_module

    calls = []
    grouped = paged_module.grouped_swiglu_forward
    monkeypatch.setattr(paged_module, "grouped_swiglu_forward",
                        lambda *a, **k: calls.append(k["wg"].shape) or grouped(*a, **k))
    path = _exported("tiny-mixtral", randomize, tmp_path / "hf")
    model = moetrain.from_pretrained(path, expert_weights="paged", cache_slots=3, expert_dtype=expert_dtype)
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        loop = model(**batch).logits
        assert not calls  # auto on the CPU: the loop
        model.set_expert_impl("grouped")
        got = model(**batch).logits
    # fp32 slots: views of all S = 3 slots; int8: the group's slots gathered (1 to 3)
    assert all(shape[0] == 3 if expert_dtype == "auto" else 1 <= shape[0] <= 3 for shape in calls)
    assert len(calls) > len(model.moe_blocks())  # 4 experts per layer, 3 slots: some layers ran in two groups
    assert torch.allclose(got, loop, rtol=1e-5, atol=1e-5)
