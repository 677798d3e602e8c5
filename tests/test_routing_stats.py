"""Routing statistics against a naive per-token loop over the model's own routing, the layer-by-layer measurement
against the resident one (to the bit, one layer's experts held at a time), and ESFT's coverage selection against a
naive loop over sorted scores."""

from __future__ import annotations

import pytest
import torch

import moetrain
from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.random_hf import preset_config, write_random_hf
from moetrain.routing_stats import RoutingStats, collect_routing_stats, select_by_coverage, stream_routing_stats

PRESETS = ("tiny-deepseek-moe", "tiny-deepseek-v3", "tiny-qwen2-moe", "tiny-mixtral")


def small_model(preset: str, randomize) -> MoEForCausalLM:
    """A 3-layer, 64-token vocabulary model of ``preset`` with decisive router logits."""
    config = ModelConfig.from_preset(preset, vocab_size=64, num_hidden_layers=3)
    model = randomize(MoEForCausalLM(config)).eval()
    if config.topk_method == "noaux_tc":  # a routing bias that changes choices, as DeepSeek-V3's does
        with torch.no_grad():
            for block in model.moe_blocks():
                block.gate.e_score_correction_bias.normal_(0.0, 0.3)
    return model


def naive_stats(model: MoEForCausalLM, batches: list[dict], max_tokens: int | None) -> tuple[dict, dict, int]:
    """Per layer (gate sums, hit counts) / tokens, one token and one top-k slot at a time, from the routing the
    full forward returns (``MoEOutput.routings``), counting real tokens in row-major order up to ``max_tokens``."""
    experts = model.config.num_experts
    gate = {i: [0.0] * experts for i in model.config.moe_layers}
    hits = {i: [0.0] * experts for i in model.config.moe_layers}
    tokens = 0
    with torch.no_grad():
        for batch in batches:
            if max_tokens is not None and tokens >= max_tokens:
                break
            out = model(**batch)
            mask = batch.get("attention_mask")
            flat_mask = [True] * batch["input_ids"].numel() if mask is None else mask.reshape(-1).bool().tolist()
            budget = None if max_tokens is None else max_tokens - tokens
            counted = []
            for t, real in enumerate(flat_mask):
                if real and (budget is None or len(counted) < budget):
                    counted.append(t)
            for layer, routing in out.routings.items():
                for t in counted:
                    for slot in range(routing.topk_idx.shape[1]):
                        e = int(routing.topk_idx[t, slot])
                        gate[layer][e] += float(routing.topk_weight[t, slot])
                        hits[layer][e] += 1.0
            tokens += len(counted)
    to_tensor = lambda d: {i: torch.tensor(v, dtype=torch.float64) / tokens for i, v in d.items()}  # noqa: E731
    return to_tensor(gate), to_tensor(hits), tokens


@pytest.mark.parametrize("preset", PRESETS)
def test_scores_equal_a_naive_per_token_loop(preset, randomize):
    model = small_model(preset, randomize)
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 64, (2, 12), generator=g)} for _ in range(3)]
    # padding in the second batch is not counted; max_tokens ends inside the third batch
    batches[1]["attention_mask"] = torch.ones(2, 12, dtype=torch.long)
    batches[1]["attention_mask"][1, 7:] = 0
    max_tokens = 24 + 19 + 5
    gate, hits, tokens = naive_stats(model, batches, max_tokens)
    stats = collect_routing_stats(model, batches, max_tokens=max_tokens, progress=False)
    assert stats.tokens == tokens == max_tokens
    assert stats.layers == model.config.moe_layers
    for layer in stats.layers:
        torch.testing.assert_close(stats.gate_score[layer], gate[layer], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.token_ratio[layer], hits[layer], rtol=0, atol=1e-12)
        assert float(stats.token_ratio[layer].sum()) == pytest.approx(model.config.num_experts_per_tok, abs=1e-12)
        assert stats.gate_score[layer].dtype == torch.float64
        assert stats.gate_score[layer].shape == (model.config.num_experts,)
        assert (stats.gate_score[layer] > 0).sum() > model.config.num_experts_per_tok  # routing is spread
    assert model.training is False


def test_all_tokens_and_plain_tensors(randomize):
    """Without max_tokens every token counts; plain (B, L) tensors are input_ids; training mode is restored."""
    model = small_model("tiny-deepseek-moe", randomize).train()
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(0, 64, (3, 8), generator=g) for _ in range(2)]
    stats = collect_routing_stats(model, iter(ids), progress=False)
    gate, hits, tokens = naive_stats(model.eval(), [{"input_ids": t} for t in ids], None)
    assert stats.tokens == tokens == 48
    for layer in stats.layers:
        torch.testing.assert_close(stats.gate_score[layer], gate[layer], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.token_ratio[layer], hits[layer], rtol=0, atol=1e-12)


def test_no_batch_is_drawn_after_enough_tokens(randomize):
    model = small_model("tiny-mixtral", randomize)
    drawn = []

    def batches():
        for i in range(5):
            drawn.append(i)
            yield torch.full((1, 10), i)

    stats = collect_routing_stats(model, batches(), max_tokens=20, progress=False)
    assert stats.tokens == 20 and drawn == [0, 1]


def test_bad_input(randomize):
    model = small_model("tiny-deepseek-moe", randomize)
    with pytest.raises(ValueError, match="max_tokens"):
        collect_routing_stats(model, [torch.zeros(1, 4, dtype=torch.long)], max_tokens=0)
    with pytest.raises(ValueError, match="no token"):
        collect_routing_stats(model, [], progress=False)
    with pytest.raises(ValueError, match="no MoE layer"):
        collect_routing_stats(torch.nn.Linear(2, 2), [torch.zeros(1, 2)])


def test_save_and_load_round_trip(tmp_path, randomize):
    model = small_model("tiny-qwen2-moe", randomize)
    stats = collect_routing_stats(model, [torch.randint(0, 64, (2, 9))], progress=False)
    stats.save(tmp_path / "s.json")
    back = RoutingStats.load(tmp_path / "s.json")
    assert back.layers == stats.layers and back.tokens == stats.tokens
    for layer in stats.layers:
        assert torch.equal(back.gate_score[layer], stats.gate_score[layer])
        assert torch.equal(back.token_ratio[layer], stats.token_ratio[layer])
    (tmp_path / "bad.json").write_text('{"layers": []}')
    with pytest.raises(ValueError, match="not a routing statistics file"):
        RoutingStats.load(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------------- coverage
def naive_coverage(score: list[float], top_p: float) -> list[int]:
    ranked = sorted(range(len(score)), key=lambda e: (-score[e], e))
    total, covered, chosen = sum(score), 0.0, []
    for e in ranked:
        chosen.append(e)
        covered += score[e]
        if covered / total >= top_p - 1e-9:
            break
    return sorted(chosen)


@pytest.mark.parametrize("top_p", [0.05, 0.2, 0.5, 0.9, 1.0])
def test_coverage_equals_a_naive_loop(top_p):
    g = torch.Generator().manual_seed(3)
    scores = {layer: torch.rand(16, generator=g, dtype=torch.float64) ** 3 for layer in (1, 2, 5)}
    selected = select_by_coverage(scores, top_p)
    assert list(selected) == [1, 2, 5]
    for layer, score in scores.items():
        assert selected[layer] == naive_coverage(score.tolist(), top_p)
        share = float(score[selected[layer]].sum() / score.sum())
        assert share >= top_p - 1e-9
        best_without_last = sorted(score.tolist(), reverse=True)[: len(selected[layer]) - 1]
        assert sum(best_without_last) / float(score.sum()) < top_p  # the fewest experts that reach it


def test_coverage_edges():
    scores = {0: torch.tensor([0.0, 0.25, 0.25, 0.5, 0.0], dtype=torch.float64)}
    assert select_by_coverage(scores, 1.0) == {0: [1, 2, 3]}  # zero scores never needed
    assert select_by_coverage(scores, 0.5) == {0: [3]}  # exactly reaching top_p is enough
    assert select_by_coverage(scores, 0.6) == {0: [1, 3]}  # a tie keeps the lower index
    assert select_by_coverage({0: torch.tensor([1.0, 3.0, 2.0])}, 0.1) == {0: [1]}
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            select_by_coverage(scores, bad)
    with pytest.raises(ValueError, match="every expert scores 0"):
        select_by_coverage({3: torch.zeros(4)}, 0.5)
    with pytest.raises(ValueError, match="negative"):
        select_by_coverage({3: torch.tensor([1.0, -1.0])}, 0.5)


# ---------------------------------------------------------------------------------------------- layer by layer
def packed_batches(vocab: int, seed: int) -> list[dict]:
    """Three (2, 12) batches: plain, padded (attention_mask), and packed (document_ids, restarting positions)."""
    g = torch.Generator().manual_seed(seed)
    batches = [{"input_ids": torch.randint(0, vocab, (2, 12), generator=g)} for _ in range(3)]
    batches[1]["attention_mask"] = torch.ones(2, 12, dtype=torch.long)
    batches[1]["attention_mask"][0, 8:] = 0
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3])  # (2, 12)
    batches[2]["document_ids"] = docs
    batches[2]["position_ids"] = torch.stack([torch.cat([torch.arange(5), torch.arange(7)]),
                                              torch.cat([torch.arange(9), torch.arange(3)])])
    return batches


@pytest.fixture
def expert_residency(monkeypatch):
    """Spy on stream_routing_stats' model: before every decoder layer runs, record (that layer, the layers whose
    routed experts are materialised anywhere in the model, their bytes), read from the model's own tensors."""
    from moetrain.models import layer_stream
    from moetrain.models.decoder import DecoderLayer

    seen: list[tuple[int, list[int], int]] = []
    models = []
    real = layer_stream.skeleton
    monkeypatch.setattr(layer_stream, "skeleton", lambda *a, **k: models.append(real(*a, **k)) or models[-1])

    def before(module, args):
        if isinstance(module, DecoderLayer) and models:
            held = {n: t for n, t in models[-1].state_dict(keep_vars=True).items()
                    if ".mlp.experts." in n and not t.is_meta}
            layers = sorted({int(n.split(".")[2]) for n in held})
            seen.append((module.layer_idx, layers, sum(t.numel() * t.element_size() for t in held.values())))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(before)
    yield seen
    handle.remove()


@pytest.mark.parametrize("preset", PRESETS)
def test_streamed_layer_by_layer_equals_resident_to_the_bit(preset, tmp_path, expert_residency):
    """The same statistics as the resident model over the same batches (padding, packing, a max_tokens cut), with
    the routed experts of one layer materialised at a time, measured before every layer's run."""
    config = preset_config(preset, layers=4, overrides={"vocab_size": 64})
    write_random_hf(config, tmp_path / "m", dtype="fp32", seed=3, max_shard_bytes=200_000, tokenizer=None)
    batches = packed_batches(64, seed=4)
    resident = collect_routing_stats(moetrain.from_pretrained(tmp_path / "m"), batches, max_tokens=60,
                                     progress=False)
    seen = expert_residency
    streamed, report = stream_routing_stats(tmp_path / "m", batches, max_tokens=60, progress=False)
    assert streamed.tokens == resident.tokens == 60 and streamed.layers == resident.layers
    for layer in resident.layers:
        assert torch.equal(streamed.gate_score[layer], resident.gate_score[layer])
        assert torch.equal(streamed.token_ratio[layer], resident.token_ratio[layer])
    moe, last = config.moe_layers, config.moe_layers[-1]
    one_layer = 3 * config.moe_intermediate_size * config.hidden_size * config.num_experts * 4  # fp32 bytes
    assert {layer for layer, _, _ in seen} == set(range(last + 1))  # every layer up to the last router ran
    assert len(seen) == 3 * (last + 1)  # each batch once through each layer
    for layer, held, nbytes in seen:
        # while a layer runs, only its own routed experts exist; the last MoE layer's are never read
        assert held == ([layer] if layer in moe and layer != last else []), (layer, held)
        assert nbytes == (one_layer if held else 0)
    assert report.expert_layers_at_once == 1 and report.peak_expert_bytes == one_layer
    assert report.model_bytes > len(moe) * one_layer > report.peak_weight_bytes
    assert report.activation_bytes == 3 * 2 * 12 * config.hidden_size * 4


def test_streamed_reads_a_transformers_directory(tiny_hf, save_hf):
    """A sharded transformers save (its own expert layout and names), as the resident load reads it."""
    path = save_hf(tiny_hf("deepseek_v3"), "v3")
    batches = packed_batches(128, seed=5)
    resident = collect_routing_stats(moetrain.from_pretrained(path), batches, progress=False)
    streamed, report = stream_routing_stats(path, batches, progress=False)
    assert streamed.tokens == resident.tokens == 3 * 24 - 4
    for layer in resident.layers:
        assert torch.equal(streamed.gate_score[layer], resident.gate_score[layer])
        assert torch.equal(streamed.token_ratio[layer], resident.token_ratio[layer])
    assert report.expert_layers_at_once == 1
