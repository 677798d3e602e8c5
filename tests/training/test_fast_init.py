"""Random initialisation: small models draw exactly what every seeded run drew before (the tiny recipe's numbers
stand); large ones are seeded per chunk on the compute device (:mod:`moetrain.models.random_init`) with the
same distribution, deterministic for a seed, whatever the thread count or the model's depth."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from moetrain.config import ModelConfig
from moetrain.models.attention import RMSNorm
from moetrain.models.decoder import INIT_STD, MoEForCausalLM
from moetrain.models.random_init import CHUNK, build_random, meta_model, random_tensors
from moetrain.training import model_build as module_mod
from moetrain.training.module import MoETrainingModule

TINY = dict(vocab_size=768)


class DrawnAsBefore(MoEForCausalLM):
    """MoEForCausalLM with the ``reset_parameters`` loop that every seeded run drew with until now."""

    def reset_parameters(self, std: float = 0.02) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.moe_blocks():
            nn.init.normal_(block.gate.weight, std=std)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


@pytest.mark.parametrize("preset,overrides", [
    ("tiny-deepseek-moe", TINY), ("tiny-qwen2-moe", {}), ("tiny-deepseek-v3", {}),
    ("tiny-mixtral", {"tie_word_embeddings": True}),
])
def test_small_models_draw_what_they_always_drew(preset, overrides):
    config = ModelConfig.from_preset(preset, **overrides)
    torch.manual_seed(0)
    before = DrawnAsBefore(config).state_dict()
    torch.manual_seed(0)
    _assert_same(MoEForCausalLM(config).state_dict(), before)
    torch.manual_seed(0)  # the training module's random init (the tiny recipe's path) is that model
    module = MoETrainingModule(preset=preset, config=overrides)
    _assert_same(module.model.state_dict(), before)


def test_seeded_init_follows_the_distribution_and_depends_on_the_seed_alone():
    config = ModelConfig.from_preset("tiny-deepseek-v3", vocab_size=CHUNK // 128 + 1000, hidden_size=128)
    model = build_random(config, 11, threads=1)
    kinds = model.init_kinds()
    assert set(kinds.values()) == {"normal", "ones", "zeros"}
    for name, tensor in model.state_dict().items():
        if kinds[name] == "normal":
            if tensor.numel() >= 4096:  # the std of n normal draws is within a few 1/sqrt(2n) of the truth
                assert abs(tensor.std().item() / INIT_STD - 1) < 5 / (2 * tensor.numel()) ** 0.5, name
                assert abs(tensor.mean().item()) < 5 * INIT_STD / tensor.numel() ** 0.5, name
        else:
            assert torch.equal(tensor, torch.full_like(tensor, 1.0 if kinds[name] == "ones" else 0.0)), name
    embed = model.model.embed_tokens.weight
    assert embed.numel() > CHUNK  # the embedding spans two chunks, and they are not copies of each other
    assert not torch.equal(embed.view(-1)[:1000], embed.view(-1)[CHUNK:CHUNK + 1000])

    _assert_same(build_random(config, 11, threads=2).state_dict(), model.state_dict())  # any thread count
    other = build_random(config, 12, threads=2).state_dict()
    assert not any(torch.equal(other[n], t) for n, t in model.state_dict().items() if kinds[n] == "normal")
    # a shallower cut of the same shape shares its layers' values: each tensor is seeded by its name alone
    shallow = build_random(ModelConfig.from_preset("tiny-deepseek-v3", **{**config.to_dict(), "num_hidden_layers": 2}),
                           11).state_dict()
    for name, tensor in shallow.items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    # the stream that random Hugging Face directories are written from holds the same values
    _assert_same(dict(random_tensors(config, 11, threads=2)), model.state_dict())


def test_seeded_model_computes_like_a_constructed_one():
    """The model built on the meta device and filled in place has its rotary frequencies, its tied embedding and
    train mode: loaded into an ordinary MoEForCausalLM, the same weights give the same loss and gradients."""
    config = ModelConfig.from_preset("tiny-qwen3-moe", tie_word_embeddings=True)
    model = build_random(config, 5)
    assert model.training and model.lm_head.weight is model.model.embed_tokens.weight
    reference = MoEForCausalLM(config)
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 12))
    for m in (model, reference):
        m(ids, labels=ids).loss.backward()
    assert torch.equal(model(ids).logits, reference(ids).logits)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), name  # None: an idle expert
    assert model.model.embed_tokens.weight.grad is not None


def test_large_models_take_the_seeded_path_with_a_progress_line(monkeypatch, capsys):
    """Above the thresholds (lowered here to a tiny model's size) the module draws one seed from torch's global
    generator, builds with it, and says what it builds and how long it took."""
    monkeypatch.setattr(module_mod, "SEEDED_INIT_MIN_PARAMS", 1)
    monkeypatch.setattr(module_mod, "ANNOUNCE_MIN_PARAMS", 1)
    config = ModelConfig.from_preset("tiny-deepseek-moe", **TINY)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    torch.manual_seed(3)
    model = MoETrainingModule(preset="tiny-deepseek-moe", config=TINY).model
    _assert_same(model.state_dict(), build_random(config, seed).state_dict())
    err = capsys.readouterr().err
    assert "building tiny-deepseek-moe: 4 layers" in err and "B parameters, random init on cpu" in err
    assert "built tiny-deepseek-moe in" in err
    torch.manual_seed(0)
    assert not torch.equal(MoETrainingModule(preset="tiny-deepseek-moe", config=TINY).model.lm_head.weight,
                           model.lm_head.weight)


def test_meta_model_runs_no_initialiser():
    config = ModelConfig.from_preset("tiny-deepseek-moe")
    state = torch.random.get_rng_state()
    model = meta_model(config)
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing drawn (meta tensors hold no values)
    assert all(t.is_meta for t in model.state_dict().values())
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == \
        {n: tuple(t.shape) for n, t in MoEForCausalLM(config).state_dict().items()}
