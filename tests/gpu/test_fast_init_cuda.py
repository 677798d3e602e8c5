"""Seeded random initialisation on the GPU: the training module builds a large model straight on this process's
GPU (no host copy), deterministic for a seed, with the init's distribution; random directories drawn on the GPU
hold the same values."""

import pytest
import torch

from moetrain.config import ModelConfig
from moetrain.models.decoder import INIT_STD
from moetrain.models.random_init import build_random, random_tensors
from moetrain.training import module as module_mod
from moetrain.training.module import MoETrainingModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_large_random_init_is_built_on_the_gpu(monkeypatch):
    monkeypatch.setattr(module_mod, "SEEDED_INIT_MIN_PARAMS", 1)
    overrides = dict(vocab_size=32768, hidden_size=512, num_experts=32, moe_intermediate_size=256)
    config = ModelConfig.from_preset("tiny-deepseek-moe", **overrides)
    torch.manual_seed(0)
    model = MoETrainingModule(preset="tiny-deepseek-moe", config=overrides).model
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    torch.manual_seed(0)
    again = MoETrainingModule(preset="tiny-deepseek-moe", config=overrides).model
    kinds = model.init_kinds()
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
        if kinds[name] == "normal" and a.numel() >= 2**16:
            assert abs(a.std().item() / INIT_STD - 1) < 0.02 and abs(a.mean().item()) < 1e-3, name
    # the random-directory stream drawn on the GPU holds the values the GPU build has
    streamed = dict(random_tensors(config, 9, device="cuda"))
    built = build_random(config, 9, device="cuda").state_dict()
    assert streamed.keys() == built.keys()
    for name, tensor in streamed.items():
        assert torch.equal(tensor, built[name].cpu()), name
