"""``init_from`` with an offload tier: a Hugging Face model streamed shard by shard with the routed
experts' masters going straight into pinned memory or NVMe. The result equals loading the whole model
(``from_pretrained``) and building the store from it: same parameters, same masters, same training."""

from __future__ import annotations

import pytest
import torch
from offload_harness import OPTIM, max_diff, train

import moetrain
from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig
from moetrain.offload.staged_init import load_into_tiers, restore_masters
from moetrain.shards import ShardError


@pytest.fixture
def hf_dir(tiny_hf, save_hf, randomize):
    return save_hf(randomize(tiny_hf("qwen3_moe"), std=0.2), "qwen3", max_shard_size="40KB")


def _data(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (1, 8), generator=g) for _ in range(12)]


@pytest.mark.parametrize("tier,master", [("cpu", "fp32"), ("nvme", "fp32"), ("cpu", "bf16_kahan")])
def test_streamed_masters_equal_a_full_load(hf_dir, tmp_path, tier, master):
    cfg = OffloadConfig(tier=tier, nvme_path=str(tmp_path) if tier == "nvme" else None, master=master, gpu_slots=3)
    full = moetrain.from_pretrained(hf_dir).train()
    staged, store = load_into_tiers(hf_dir, cfg, torch.device("cpu"))
    assert store.swap is not None if tier == "nvme" else store.cpu_bytes > 0
    ref_opt = build_optimizer(full, OPTIM, cfg)  # the store built from the loaded parameters
    opt = build_optimizer(staged, OPTIM, cfg, store=store)
    assert opt.store is store
    ref_masters = dict(ref_opt.named_master_tensors())
    masters = dict(opt.named_master_tensors())
    assert masters.keys() == ref_masters.keys() and masters
    assert all(torch.equal(masters[k], ref_masters[k]) for k in masters)
    assert max_diff(staged, full) == 0.0
    data = _data(full.config.vocab_size)
    train(full, ref_opt, data, total=6)
    train(staged, opt, data, total=6)
    ref_opt.finalize()
    opt.finalize()
    assert max_diff(staged, full) == 0.0
    ref_opt.close()
    opt.close()


def test_restore_masters_gives_the_fp32_model_back(hf_dir):
    full = moetrain.from_pretrained(hf_dir)
    staged, store = load_into_tiers(hf_dir, OffloadConfig(tier="cpu"), torch.device("cpu"))
    restore_masters(staged, store)
    assert max_diff(staged, full) == 0.0
    assert store.swap is None


def test_a_missing_expert_tensor_is_a_clean_error(hf_dir):
    index = hf_dir / "model.safetensors.index.json"
    import json

    meta = json.loads(index.read_text())
    victim = next(k for k in meta["weight_map"] if ".experts." in k or "experts" in k)
    del meta["weight_map"][victim]
    index.write_text(json.dumps(meta))
    with pytest.raises(ShardError, match="lacks"):
        load_into_tiers(hf_dir, OffloadConfig(tier="cpu"), torch.device("cpu"))


def test_fit_from_hf_weights_with_an_offload_tier_equals_resident(tmp_path):
    """The CLI path: ``init_from`` + ``tier: cpu`` (masters streamed into the tier) ends with the
    checkpoint that ``tier: none`` (the whole model loaded) ends with."""
    import os
    from pathlib import Path

    from safetensors.torch import load_file

    from moetrain.cli import main
    from moetrain.config import ModelConfig
    from moetrain.models.decoder import MoEForCausalLM
    from moetrain.models.hf import export_hf

    repo = Path(__file__).resolve().parents[2]
    torch.manual_seed(0)
    export_hf(MoEForCausalLM(ModelConfig.from_preset("tiny-deepseek-moe", vocab_size=768)), tmp_path / "hf")

    def fit(run: Path, tier: str) -> dict[str, torch.Tensor]:
        threads, cwd = torch.get_num_threads(), os.getcwd()
        os.chdir(repo)
        try:
            assert main(["fit", "--config", "recipes/tiny.yaml", "--trainer.max_steps=3",
                         f"--trainer.default_root_dir={run}", f"--model.init_from={tmp_path / 'hf'}",
                         "--model.config=null", f"--model.offload.placement.tier={tier}",
                         "--data.micro_batch_size=2"]) == 0
        finally:
            torch.set_num_threads(threads)
            os.chdir(cwd)
        ckpt = run / "checkpoints" / (run / "checkpoints" / "last").read_text().strip()
        out: dict[str, torch.Tensor] = {}
        for shard in ckpt.glob("model-*.safetensors"):
            out.update(load_file(shard))
        return out

    resident, offloaded = fit(tmp_path / "none", "none"), fit(tmp_path / "cpu", "cpu")
    assert resident.keys() == offloaded.keys()
    assert max((resident[k] - offloaded[k]).abs().max().item() for k in resident) <= 1e-6

    # a resume of such a run: the saved masters replace the ones streamed from init_from in the store
    run = tmp_path / "cpu"
    (run / "checkpoints" / "last").write_text("step-3\n")
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(run, resumed)
    threads, cwd = torch.get_num_threads(), os.getcwd()
    os.chdir(repo)
    try:
        assert main(["fit", "--config", "recipes/tiny.yaml", "--trainer.max_steps=5",
                     f"--trainer.default_root_dir={resumed}", f"--model.init_from={tmp_path / 'hf'}",
                     "--model.config=null", "--model.offload.placement.tier=cpu", "--data.micro_batch_size=2",
                     "--ckpt_path=last"]) == 0
        assert main(["fit", "--config", "recipes/tiny.yaml", "--trainer.max_steps=5",
                     f"--trainer.default_root_dir={tmp_path / 'straight'}", f"--model.init_from={tmp_path / 'hf'}",
                     "--model.config=null", "--model.offload.placement.tier=cpu", "--data.micro_batch_size=2"]) == 0
    finally:
        torch.set_num_threads(threads)
        os.chdir(cwd)
    ends = []
    for root in (resumed, tmp_path / "straight"):
        out: dict[str, torch.Tensor] = {}
        for shard in (root / "checkpoints" / "step-5").glob("model-*.safetensors"):
            out.update(load_file(shard))
        ends.append(out)
    assert max((ends[0][k] - ends[1][k]).abs().max().item() for k in ends[1]) <= 1e-6


def test_paged_compute_weights_load_into_host_memory_and_train_like_resident(hf_dir):
    """resident_weights=no: the experts' compute weights are loaded into the pager's host memory, never into
    device parameters, and training equals the staged load with resident weights."""
    resident, store = load_into_tiers(hf_dir, OffloadConfig(tier="cpu", gpu_slots=3), torch.device("cpu"))
    ref_opt = build_optimizer(resident, OPTIM, OffloadConfig(tier="cpu", gpu_slots=3), store=store)
    cfg = OffloadConfig(tier="cpu", gpu_slots=3, resident_weights="no")
    paged, paged_store = load_into_tiers(hf_dir, cfg, torch.device("cpu"))
    assert paged_store.pager is not None
    experts = paged.expert_parameter_names()
    assert max(p.untyped_storage().nbytes() for n, p in paged.named_parameters() if n in experts) <= 8
    paged.cpu()  # what Lightning does at teardown: the placeholders must not grow to full size
    assert max(p.untyped_storage().nbytes() for n, p in paged.named_parameters() if n in experts) <= 8
    opt = build_optimizer(paged, OPTIM, cfg, store=paged_store)
    assert opt.pager is paged_store.pager
    for rec in opt.store:  # the pager's rows are the checkpoint's weights
        ref_rec = ref_opt.store.records[rec.key]
        assert torch.equal(opt.pager.weights(rec.layer, rec.expert),
                           torch.cat([p.detach().reshape(-1) for p in ref_rec.params]))
    data = _data(resident.config.vocab_size)
    train(resident, ref_opt, data, total=6)
    train(paged, opt, data, total=6)
    ref_masters, masters = dict(ref_opt.named_master_tensors()), dict(opt.named_master_tensors())
    assert max((masters[n] - ref_masters[n]).abs().max().item() for n in masters) <= 1e-6
    dense = [n for n, _ in resident.named_parameters() if n not in experts]
    params = dict(paged.named_parameters())
    assert max((params[n] - p).abs().max().item() for n, p in resident.named_parameters() if n in dense) <= 1e-6
    ref_opt.close()
    opt.close()


def test_weights_stream_into_paged_tiers_again(hf_dir, tiny_hf, save_hf, randomize):
    """A resume after init_from with paged compute weights streams the saved weights into the store and the
    pager (the parameters are placeholders): the pager's rows become the new weights."""
    from moetrain.models.hf import load_weights

    cfg = OffloadConfig(tier="cpu", gpu_slots=3, resident_weights="no")
    model, store = load_into_tiers(hf_dir, cfg, torch.device("cpu"))
    other = save_hf(randomize(tiny_hf("qwen3_moe"), std=0.3), "qwen3-other", max_shard_size="40KB")
    expected = moetrain.from_pretrained(other)
    load_weights(model, other, expert_sink=store.write_master)
    store.finish_staged()
    params = dict(expected.named_parameters())
    for rec in store:
        want = torch.cat([params[n].detach().reshape(-1) for n in rec.names])
        assert torch.equal(store.pager.weights(rec.layer, rec.expert), want)
        assert torch.equal(store.master_weights(rec)[0].reshape(-1), params[rec.names[0]].detach().reshape(-1))
    assert not torch.equal(store.pager.weights(0, 0), torch.cat([p.detach().reshape(-1) for p in
                                                                 moetrain.from_pretrained(hf_dir).model.layers[0]
                                                                 .mlp.experts[0].parameters()]))
    store.close()


@pytest.mark.parametrize("tier,master,compute", [("cpu", "fp32", "auto"), ("nvme", "fp32_split", "auto"),
                                                 ("cpu", "bf16_sr", "auto"), ("cpu", "fp32", "bf16")])
def test_a_random_init_streamed_into_tiers_equals_building_then_storing(tmp_path, tier, master, compute):
    """``random_into_tiers``: every expert tensor drawn in fp32 one at a time, its master into the store, its compute
    weight into the model, is the model ``build_random`` gives with the store built from it: the same bits in
    parameters and masters, and the same training after (fp32 compute weights: the CPU has no bf16 matmul with fp32
    activations). ``bf16_sr`` with ``step_on: gpu``: host records without their masters (the weights hold them)."""
    from moetrain.config import ModelConfig
    from moetrain.models.random_init import build_random
    from moetrain.offload.staged_init import random_into_tiers

    config = ModelConfig.from_preset("tiny-qwen3-moe", num_hidden_layers=2)
    cfg = OffloadConfig(tier=tier, nvme_path=str(tmp_path) if tier == "nvme" else None, master=master,
                        compute_dtype=compute, step_on="gpu", gpu_slots=3)
    full = build_random(config, 17)
    staged, store = random_into_tiers(config, 17, cfg, device=torch.device("cpu"))
    assert store.swap is not None if tier == "nvme" else store.cpu_bytes > 0
    assert all(rec.host_skip for rec in store) == (master == "bf16_sr")
    ref_opt = build_optimizer(full, OPTIM, cfg)  # the store built from the fp32 model's expert parameters
    opt = build_optimizer(staged, OPTIM, cfg, store=store)
    ref_masters, masters = dict(ref_opt.named_master_tensors()), dict(opt.named_master_tensors())
    assert masters.keys() == ref_masters.keys() and masters
    assert all(torch.equal(masters[k], ref_masters[k]) for k in masters)
    expected = {n: p.dtype for n, p in full.named_parameters()}
    assert {n: p.dtype for n, p in staged.named_parameters()} == expected  # bf16 experts where the store cast them
    assert max_diff(staged, full) == 0.0
    if compute == "bf16":
        assert {p.dtype for b in staged.moe_blocks() for p in b.experts.parameters()} == {torch.bfloat16}
        ref_opt.close()
        opt.close()
        return
    data = _data(config.vocab_size)
    train(full, ref_opt, data, total=4)
    train(staged, opt, data, total=4)
    ref_opt.finalize()
    opt.finalize()
    assert max_diff(staged, full) == 0.0
    ref_opt.close()
    opt.close()


def test_a_large_random_init_with_a_tier_streams_into_the_store(monkeypatch, capsys):
    """The training module above ``SEEDED_INIT_MIN_PARAMS`` (lowered here) with an offload tier builds through
    ``random_into_tiers``: the store its build filled goes to the optimizer, the weights are ``build_random``'s for
    the seed drawn from the global generator, and the build is announced."""
    from moetrain.config import ModelConfig
    from moetrain.models.random_init import build_random
    from moetrain.offload.config import OffloadSettings
    from moetrain.training import model_build
    from moetrain.training.module import MoETrainingModule

    monkeypatch.setattr(model_build, "SEEDED_INIT_MIN_PARAMS", 1)
    monkeypatch.setattr(model_build, "ANNOUNCE_MIN_PARAMS", 1)
    overrides = {"num_hidden_layers": 2}
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    torch.manual_seed(5)
    settings = OffloadSettings()
    settings.placement.tier = "cpu"
    module = MoETrainingModule(preset="tiny-qwen3-moe", config=overrides, offload=settings)
    store = module._prebuilt_store
    assert store is not None and len(list(store)) == sum(len(b.experts) for b in module.model.moe_blocks())
    reference = build_random(ModelConfig.from_preset("tiny-qwen3-moe", **overrides), seed)
    assert max_diff(module.model, reference) == 0.0
    ref = dict(reference.named_parameters())
    for rec in store:
        for name, master in zip(rec.names, store.master_weights(rec), strict=True):
            assert torch.equal(master, ref[name].detach()), name
    err = capsys.readouterr().err
    assert "building tiny-qwen3-moe: 2 layers" in err and "built tiny-qwen3-moe in" in err
    module.release_offload()  # the store no optimizer took is closed
    assert module._prebuilt_store is None
