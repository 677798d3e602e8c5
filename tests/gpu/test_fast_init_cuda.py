"""Seeded random initialisation on the GPU: the training module builds a large model straight on this process's
GPU (no host copy), deterministic for a seed, with the init's distribution; random directories drawn on the GPU
hold the same values."""

import pytest
import torch

from moetrain.config import ModelConfig
from moetrain.models.decoder import INIT_STD
from moetrain.models.random_init import build_random, random_tensors
from moetrain.training import model_build as module_mod
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


@pytest.mark.parametrize("master", ["bf16_sr", "fp32_split", "fp32"])
def test_a_random_init_streamed_into_tiers_on_the_gpu_equals_the_fp32_build(master):
    """``random_into_tiers`` on the GPU (every expert tensor drawn there in fp32, its record assembled there and
    copied into pinned memory once; bf16 compute weights): the bits of ``build_random`` on the GPU with the store
    built from it, masters and compute weights alike."""
    from moetrain.offload import build_optimizer
    from moetrain.offload.config import OffloadConfig
    from moetrain.offload.staged_init import random_into_tiers
    from moetrain.optim import OptimizerConfig

    overrides = dict(vocab_size=4096, hidden_size=256, num_experts=16, moe_intermediate_size=128)
    config = ModelConfig.from_preset("tiny-qwen3-moe", **overrides)
    cfg = OffloadConfig(tier="cpu", master=master, moments="int8", step_on="gpu")
    cuda = torch.device("cuda")
    reference = build_random(config, 23, device=cuda)
    staged, store = random_into_tiers(config, 23, cfg, device=cuda)
    assert store.pin and all(bool(rec.host_skip) == (master != "fp32") for rec in store)
    ref_opt = build_optimizer(reference, OptimizerConfig(), cfg)
    opt = build_optimizer(staged, OptimizerConfig(), cfg, store=store)
    ref_masters, masters = dict(ref_opt.named_master_tensors()), dict(opt.named_master_tensors())
    assert masters.keys() == ref_masters.keys() and masters
    for name, tensor in masters.items():
        assert torch.equal(tensor, ref_masters[name]), name
    ref = dict(reference.named_parameters())
    for name, p in staged.named_parameters():
        assert p.device.type == "cuda" and p.dtype == ref[name].dtype and torch.equal(p, ref[name]), name
    assert {p.dtype for b in staged.moe_blocks() for p in b.experts.parameters()} == {torch.bfloat16}
    ref_opt.close()
    opt.close()
