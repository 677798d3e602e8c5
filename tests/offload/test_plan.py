"""The planner's byte counts against the real model and store, per state format; the activation estimate against
what autograd saves; the fit verdicts, the step floor and the largest preset. The hot-cache sizing:
test_plan_hot_cache.py."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import yaml
from offload_harness import tiny_model

from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.offload.config import OffloadConfig
from moetrain.offload.nvme import align_up
from moetrain.offload.plan import (
    GPU_RESERVE,
    HOST_RESERVE,
    Machine,
    activation_bytes,
    best_fit,
    count_parameters,
    fit_options,
    largest_preset,
    layer_activation_bytes,
    make_plan,
    plan_from_recipe,
)
from moetrain.offload.store import ExpertStore

GiB = 2**30
MASTER_BYTES = {"fp32": 4, "fp32_split": 2 + 2, "bf16_sr": 2, "bf16_kahan": 2 + 2}  # bf16 + a 16-bit part
MOMENT_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}


def state_bytes(per_expert: int, master: str, moments: str, block: int = 256) -> int:
    """One expert's state bytes from the formats' element sizes: master, two moments, and for int8 one fp32
    scale per block of each moment (the tiny experts' matrices are whole multiples of the block)."""
    scales = 2 * 4 * per_expert // block if moments == "int8" else 0
    return per_expert * (MASTER_BYTES[master] + 2 * MOMENT_BYTES[moments]) + scales


def test_counts_match_the_model():
    model = tiny_model(num_experts=16)
    dense, expert, per_expert = count_parameters(model.config)
    names = model.expert_parameter_names()
    params = dict(model.named_parameters())
    assert expert == sum(params[n].numel() for n in names)
    assert dense == sum(p.numel() for n, p in params.items() if n not in names)
    assert per_expert == sum(p.numel() for p in model.moe_blocks()[0].experts[0].parameters())


def test_bytes_per_tier_and_overflow(tmp_path):
    model = tiny_model(num_experts=16)
    dense, expert, per_expert = count_parameters(model.config)
    record = align_up(12 * per_expert)  # the store's aligned fp32 record
    cfg = OffloadConfig(tier="cpu", gpu_budget_gb=4 * record / GiB, cpu_budget_gb=10 * record / GiB,
                        nvme_path=str(tmp_path))
    plan = make_plan(model.config, cfg, tokens_per_step=64, gpu_capacity=GiB, host_capacity=GiB, disk_free=GiB)
    # fp32 dense state and its bf16 autocast copies; bf16 expert weights and grads (compute_dtype auto on a GPU)
    assert plan.gpu_bytes == (16 + 2) * dense + 2 * expert + 2 * expert + 4 * record + activation_bytes(
        model.config, 64) + GPU_RESERVE
    assert plan.nvme_bytes == 32 * record - 10 * record
    assert plan.host_bytes == 10 * record + 4 * record + HOST_RESERVE  # state in memory + NVMe staging
    assert plan.fits() == {"gpu": False, "host": False, "disk": True}  # the reserves alone exceed 1 GiB
    fp32 = make_plan(model.config, OffloadConfig(tier="cpu", compute_dtype="fp32", gpu_budget_gb=cfg.gpu_budget_gb), 64)
    assert fp32.gpu_bytes - plan.gpu_bytes == 2 * expert + 2 * expert  # 4 B weights and grads instead of 2
    # the store places records the same way
    store = ExpertStore(model, cfg)
    assert store.cpu_bytes == 10 * record and store.nvme_bytes == plan.nvme_bytes
    store.close()


@pytest.mark.parametrize("master,moments", list(itertools.product(("fp32", "fp32_split", "bf16_sr", "bf16_kahan"),
                                                                   ("fp32", "bf16", "int8"))))
def test_compressed_state_bytes_per_tier_and_on_the_link(master, moments):
    model = tiny_model(num_experts=16)
    _, expert, per_expert = count_parameters(model.config)
    n_records = 2 * 16
    record = align_up(state_bytes(per_expert, master, moments))
    host_cfg = OffloadConfig(tier="cpu", master=master, moments=moments)
    host_only = make_plan(model.config, host_cfg, tokens_per_step=10_000, host_capacity=GiB)
    # a bf16_sr master, or the bf16 half of a fp32_split one, is held by the weights alone (step_on gpu)
    held = align_up(2 * per_expert, 64) if master in ("bf16_sr", "fp32_split") else 0
    assert host_only.host_bytes == n_records * (record - held) + HOST_RESERVE and host_only.nvme_bytes == 0
    store = ExpertStore(model, host_cfg)  # the store places them the same way
    assert store.cpu_bytes == n_records * (record - held) and not store.nvme_bytes
    store.close()
    assert host_only.state_bpp == state_bytes(per_expert, master, moments) / per_expert
    # 10 k tokens touch every expert: each one's state goes up and comes back, but a bf16_sr master or the bf16
    # half of a fp32_split one, which the resident compute weights hold (moetrain.offload.weight_masters)
    assert host_only.active_experts == pytest.approx(n_records)
    paged = state_bytes(per_expert, master, moments) - (2 * per_expert if master in ("bf16_sr", "fp32_split") else 0)
    assert host_only.moved_bytes == pytest.approx(2 * n_records * paged)
    on_disk = make_plan(model.config, OffloadConfig(tier="nvme", nvme_path="unused", master=master, moments=moments,
                                                    gpu_slots=3), tokens_per_step=64, disk_free=GiB)
    assert on_disk.nvme_bytes == n_records * record
    assert on_disk.host_bytes == 3 * record + HOST_RESERVE  # staging for the 3 slots
    assert f"master {master}, moments {moments}" in host_only.format()
    assert expert * 12 / (host_only.state_bpp * expert) == pytest.approx(12 * per_expert / state_bytes(
        per_expert, master, moments))


def test_layerwise_gradients_only_with_accumulation_1_no_clipping_and_the_gpu_path():
    recipe = {"model": {"preset": "tiny-deepseek-moe", "accumulate_grad_batches": 1,
                        "optimizer": {"max_grad_norm": 0.0},
                        "offload": {"placement": {"tier": "cpu"}, "schedule": {"step_on": "gpu"}}},
              "data": {"seq_len": 64, "micro_batch_size": 2}}
    config = ModelConfig.from_preset("tiny-deepseek-moe")
    _, expert, _ = count_parameters(config)
    layerwise = plan_from_recipe(recipe, gpu_capacity=GiB, host_capacity=GiB)
    assert layerwise.layerwise_grads
    for key, value in (("accumulate_grad_batches", 2), ("optimizer", {"max_grad_norm": 1.0}),
                       ("offload", {"placement": {"tier": "cpu"}, "schedule": {"step_on": "auto"}})):
        other = {**recipe, "model": {**recipe["model"], key: value}}
        plan = plan_from_recipe(other, gpu_capacity=GiB, host_capacity=GiB)
        assert not plan.layerwise_grads
        # every expert's bf16 gradient instead of one MoE layer's (3 MoE layers of equal size)
        assert plan.gpu_bytes - layerwise.gpu_bytes == 2 * expert - 2 * expert // len(config.moe_layers)


def _param_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters, each storage once (tied weights, packed experts)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def test_load_peak_of_a_random_init_is_the_fp32_model():
    """Random initialisation builds every parameter in fp32: the planner's load peak is those bytes."""
    model = tiny_model(num_experts=16)
    plan = make_plan(model.config, OffloadConfig(tier="cpu"), tokens_per_step=8)
    assert not plan.streamed_load
    assert plan.gpu_load_bytes == _param_bytes(model)
    squeezed = make_plan(model.config, OffloadConfig(tier="cpu"), tokens_per_step=8,
                         gpu_capacity=plan.gpu_load_bytes - 1) if plan.gpu_load_bytes > plan.gpu_bytes else None
    if squeezed is not None:
        assert squeezed.fits()["gpu"] is False and "peak at load" in squeezed.format()


@pytest.mark.parametrize("compute_dtype", ["bf16", "fp32"])
def test_load_peak_of_init_from_with_a_tier_is_what_staged_init_builds(tiny_hf, save_hf, compute_dtype):
    """init_from with a tier streams the masters into the store: the planner's load peak equals the bytes of
    the parameters ``load_into_tiers`` builds (fp32 dense, experts in their compute dtype); without a tier
    ``from_pretrained`` loads the whole model in fp32."""
    import moetrain
    from moetrain.offload.staged_init import load_into_tiers

    path = save_hf(tiny_hf("mixtral"), "mixtral")
    cfg = OffloadConfig(tier="cpu", compute_dtype=compute_dtype)
    model, store = load_into_tiers(path, cfg, torch.device("cpu"))
    store.close()
    plan = make_plan(model.config, cfg, tokens_per_step=8, streamed_load=True)
    assert plan.streamed_load and plan.gpu_load_bytes == _param_bytes(model)
    dense, expert, _ = count_parameters(model.config)
    assert plan.gpu_load_bytes == 4 * dense + {"bf16": 2, "fp32": 4}[compute_dtype] * expert
    none = make_plan(model.config, OffloadConfig(tier="none"), tokens_per_step=8, streamed_load=True)
    assert not none.streamed_load and none.gpu_load_bytes == _param_bytes(moetrain.from_pretrained(path))


def test_recipe_decides_the_load_path_and_plans_before_the_download(tmp_path, capsys):
    """init_from + tier cpu/nvme: the streamed load peak; no init_from or tier none: the fp32 model. A recipe
    whose init_from directory is missing plans the shape of its preset, with a note; without a preset (or with
    model.config overrides, which fit refuses next to init_from) it is an error naming the key."""
    from moetrain.config import ConfigError
    from moetrain.offload.plan import main, recipe_model

    missing = str(tmp_path / "not-downloaded")
    base = {"model": {"preset": "tiny-mixtral", "init_from": missing, "offload": {"placement": {"tier": "cpu"}}},
            "data": {"seq_len": 16}}
    config, note = recipe_model(base)
    assert config == ModelConfig.from_preset("tiny-mixtral") and missing in note and "tiny-mixtral" in note
    dense, expert, _ = count_parameters(config)
    assert plan_from_recipe(base, gpu_capacity=GiB).gpu_load_bytes == 4 * dense + 2 * expert
    for key, value in (("init_from", None), ("offload", {"placement": {"tier": "none"}})):
        other = {**base, "model": {**base["model"], key: value}}
        assert plan_from_recipe(other, gpu_capacity=GiB).gpu_load_bytes == 4 * (dense + expert)
    with pytest.raises(ConfigError, match="model.preset"):
        recipe_model({"model": {"init_from": missing}})
    with pytest.raises(ConfigError, match="model.config"):
        recipe_model({"model": {**base["model"], "config": {"num_experts": 4}}})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base))
    assert main(["--config", str(recipe), "--gpu-gb=80"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == note and out[1].startswith("offload tier: cpu")
    assert any(line.startswith("  gpu   peak at load") and "streams the experts' masters" in line for line in out)
    del base["model"]["preset"]
    recipe.write_text(yaml.safe_dump(base))
    assert main(["--config", str(recipe)]) == 2
    assert "does not exist" in capsys.readouterr().err


def saved_activation_bytes(config: ModelConfig, tokens: int, checkpointed: bool = False, residual: str = "fp32") -> int:
    """Bytes of the tensors autograd saves for backward in one bf16-autocast forward with the loss
    (each storage once; parameters left out), on the CPU: the reference for the estimate. With
    ``checkpointed`` the layers' own tensors are not saved (recomputation makes them in backward)."""
    torch.manual_seed(0)
    model = MoEForCausalLM(config)
    model.set_expert_impl("grouped")
    model.set_activation_checkpointing(checkpointed)
    model.set_residual_dtype(residual)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    kept = []  # each storage counted stays alive, so that no later tensor reuses its address and hides it

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
            kept.append(storage)
        return t

    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, labels=ids)
    return sum(saved.values())


@pytest.mark.parametrize("family,extra", [("deepseek_moe", {"num_shared_experts": 1, "first_k_dense_replace": 1}),
                                          ("qwen3_moe", {"head_dim": 32, "qk_norm": "head"}),
                                          ("mixtral", {}), ("olmoe", {"qk_norm": "full"})])
def test_activation_estimate_against_what_autograd_saves(family, extra):
    """Per token (the difference of two lengths cancels the bf16 weight copies, counted in their own row),
    the estimate is within 20% of the bytes saved in a real forward. SDPA's causal path keeps no (L, L)
    matrix, as on the GPU; MLA's unequal head dims take the math path on the CPU, so it is not compared."""
    config = ModelConfig(family=family, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=48, **extra)
    measured = saved_activation_bytes(config, 512) - saved_activation_bytes(config, 256)
    estimated = activation_bytes(config, 512) - activation_bytes(config, 256)
    assert abs(estimated - measured) < 0.2 * measured, (estimated, measured)
    # checkpointed layers: what stays saved is the layers' inputs and the loss; the largest layer's own set
    # is there only while backward recomputes it. The saved bytes of these small runs vary by a fifth from
    # run to run, so the comparison is of the share that checkpointing keeps: both well under a third.
    kept = saved_activation_bytes(config, 512, True) - saved_activation_bytes(config, 256, True)
    kept_estimate = (activation_bytes(config, 512, checkpointed=True) - layer_activation_bytes(config, 512)
                     - activation_bytes(config, 256, checkpointed=True) + layer_activation_bytes(config, 256))
    assert kept < 0.3 * measured and kept_estimate < 0.3 * estimated, (kept, measured, kept_estimate, estimated)
    assert activation_bytes(config, 512, checkpointed=True) < activation_bytes(config, 512)
    # a bf16 residual stream (model.residual_dtype): the norms' inputs and residual sums in bf16
    measured = (saved_activation_bytes(config, 512, residual="bf16")
                - saved_activation_bytes(config, 256, residual="bf16"))
    estimated = activation_bytes(config, 512, residual_bytes=2) - activation_bytes(config, 256, residual_bytes=2)
    assert abs(estimated - measured) < 0.2 * measured, (estimated, measured)
    assert estimated < activation_bytes(config, 512) - activation_bytes(config, 256)


def test_fit_verdicts_and_floor():
    model = tiny_model(num_experts=16)
    cfg = OffloadConfig(tier="nvme", nvme_path="/nonexistent-folder")
    plan = make_plan(model.config, cfg, tokens_per_step=1_000_000, gpu_capacity=1, host_capacity=1 << 40,
                     disk_free=10, link_gbps=1e-3, compute_tflops=1e9)
    assert plan.fits() == {"gpu": False, "host": True, "disk": False}
    assert plan.active_experts > 31.99  # a million tokens touch every expert
    dense, expert, _ = count_parameters(model.config)
    assert abs(plan.moved_bytes - 24 * expert) < 1e-3 * 24 * expert
    assert plan.floor_s == plan.transfer_s == plan.moved_bytes / 1e6
    text = plan.format()
    assert "DOES NOT FIT" in text and "link-bound" in text
    none = make_plan(model.config, OffloadConfig(tier="none"), tokens_per_step=64, gpu_capacity=1 << 40)
    assert none.moved_bytes == 0 and "compute-bound" in none.format()
    assert none.gpu_bytes == (16 + 2) * dense + 16 * expert + activation_bytes(model.config, 64) + GPU_RESERVE


def test_expected_active_experts_follow_the_token_count():
    model = tiny_model(num_experts=16)
    few = make_plan(model.config, OffloadConfig(tier="cpu"), tokens_per_step=1)
    assert abs(few.active_experts - 2 * 16 * (1 - (15 / 16) ** 2)) < 1e-9  # 2 layers, 1 token, top-2


H100 = Machine(gpu=80 * GiB, host=125 * GiB, disk=64 * GiB)
H100_LARGE_DISK = Machine(gpu=80 * GiB, host=125 * GiB, disk=1024 * GiB)


def test_deepseek_moe_16b_on_an_h100_machine():
    """80 GiB GPU, 125 GiB host, a disk large enough for the download, the swap and a checkpoint, 4096-token
    micro-batches. From the parameter counts: GPU: dense 18 B/param + bf16 expert weights 2 B/param + every
    expert's bf16 gradient 2 B/param is already past 80 GiB with the reserve, so only layer-wise gradients fit.
    Host: fp32 state, 12 B/param of 14.9 B expert parameters = 167 GiB, is more than the host; bf16_sr + int8
    state, 4.03 B/param = 56 GiB, fits it alone; fp32 state fits with the overflow on NVMe."""
    config = ModelConfig.from_preset("deepseek-moe-16b")
    dense, expert, per_expert = count_parameters(config)
    machine = H100_LARGE_DISK
    assert 18 * dense + 4 * expert + GPU_RESERVE > machine.gpu
    fp32_state = 12 * expert
    assert fp32_state > machine.host and 4.03125 * expert + HOST_RESERVE < machine.host
    options = {(c.tier, c.master, c.moments, c.layerwise_grads): c for c in fit_options(config, machine)
               if not c.paged_weights}
    assert not any(c.plan.fits()["gpu"] for c in options.values() if not c.layerwise_grads)
    assert options["cpu", "fp32_split", "fp32", True].plan.fits()["host"] is False
    assert options["cpu", "bf16_sr", "int8", True].plan.fits_all()
    staging = options["cpu+nvme", "fp32_split", "fp32", True].plan
    assert staging.fits_all() and staging.nvme_bytes <= staging.disk_bytes <= machine.disk
    # the overflow's host budget leaves room for everything else at the host's higher peak (load or training)
    assert max(staging.host_bytes, staging.host_load_bytes) <= machine.host
    choice = best_fit(config, machine)
    assert (choice.tier, choice.master, choice.moments, choice.layerwise_grads) == ("cpu+nvme", "fp32_split", "fp32",
                                                                                    True)


def test_largest_preset_on_an_h100_machine():
    """On the GPU machines here (64 GiB of disk) the disk decides: a fine-tune needs its Hugging Face download (bf16,
    2 B/param) and a checkpoint (fp32 weights, 4 B/param; fp32 dense moments, 8 B/param; the experts' moments at
    2.03 B/param in int8, the most compact) on it. Every preset above OLMoE-1B-7B needs more than 64 GiB for that
    alone, and OLMoE only with int8 moments. The GPU would stop Qwen3-30B-A3B and Mixtral-8x7B with resident
    weights anyway, even with a streamed load (fp32 dense + bf16 experts): their training footprint does, even
    before activations (fp32 dense state and bf16 copies 18 B/param, bf16 expert weights, one layer's bf16 expert
    gradients, the reserve). DeepSeek-V3's compressed expert state alone (4.03 B/param of 654 B) is past host +
    disk. A random initialisation under a tier streams its experts' masters into the store as a download's do, so
    its load is not the fp32 model (past 80 GiB) either."""
    results = largest_preset(H100)
    names = [c.name for c, _ in results]
    answer, choice = next((c, fit) for c, fit in results if fit is not None)
    assert answer.name == "olmoe-1b-7b"

    def download_and_checkpoint(config: ModelConfig, moment_bytes: float) -> float:
        dense, expert, _ = count_parameters(config)
        return 2 * (dense + expert) + 4 * (dense + expert) + 8 * dense + moment_bytes * expert

    for config, fit in results[:names.index(answer.name)]:
        assert fit is None and download_and_checkpoint(config, 2.03125) > H100.disk
        assert not any(c.plan.fits()["disk"] for c in fit_options(config, H100))
    assert choice.moments == "int8" and download_and_checkpoint(answer, 2.03125) <= H100.disk
    assert download_and_checkpoint(answer, 4) > H100.disk  # bf16 moments would not fit
    assert choice.plan.disk_bytes == pytest.approx(download_and_checkpoint(answer, 2.03125), rel=1e-6)
    qwen3 = count_parameters(ModelConfig.from_preset("qwen3-30b-a3b"))
    assert 4 * qwen3[0] + 2 * qwen3[1] < H100.gpu  # its streamed load fits: training is what does not
    for name in ("qwen3-30b-a3b", "mixtral-8x7b"):
        config = ModelConfig.from_preset(name)
        dense, expert, _ = count_parameters(config)
        assert 4 * (dense + expert) > H100.gpu  # the fp32 model would not even load
        assert 18 * dense + 2 * expert + 2 * expert // len(config.moe_layers) + GPU_RESERVE > H100.gpu
        drawn = fit_options(config, H100, streamed_load=False)
        assert all(c.plan.streamed_load and c.plan.gpu_load_bytes <= 4 * dense + 2 * expert for c in drawn)
    v3 = ModelConfig.from_preset("deepseek-v3").param_counts()
    assert math.floor(4.03125 * v3["expert"]) > H100.host + H100.disk
    # sizes are in decreasing order, so the answer is the largest that fits
    totals = [c.param_counts()["total"] for c, _ in results]
    assert totals == sorted(totals, reverse=True)


def test_streamed_load_lets_mixtral_load_on_an_h200_machine():
    """Mixtral-8x7B at 2048-token micro-batches on an H200 machine: its fp32 model at load (4 B/param of 46.7 B)
    is past 139 GiB, so it does not load without a tier; the streamed load (fp32 dense + bf16 experts) is not, and
    one placement (layer-wise gradients, compressed state) then fits every tier, on a disk that holds its 87 GiB
    download, the swap and a checkpoint. A random initialisation under a tier streams too (no download)."""
    config = ModelConfig.from_preset("mixtral-8x7b")
    dense, expert, _ = count_parameters(config)
    h200 = Machine(gpu=139 * GiB, host=125 * GiB, disk=1024 * GiB)
    assert 4 * dense + 2 * expert < h200.gpu < 4 * (dense + expert)
    whole = make_plan(config, OffloadConfig(tier="none"), 2048, gpu_capacity=h200.gpu, host_capacity=h200.host,
                      from_checkpoint=True)
    assert whole.gpu_load_bytes == 4 * (dense + expert) and whole.fits()["gpu"] is False
    drawn = fit_options(config, h200, 2048, streamed_load=False)
    assert any(c.plan.fits_all() and c.plan.load_source == "random init" for c in drawn)
    choice = best_fit(config, h200, micro_batch_tokens=2048)
    assert choice is not None and choice.plan.streamed_load and choice.layerwise_grads
    assert choice.plan.gpu_load_bytes == 4 * dense + 2 * expert < choice.plan.gpu_bytes <= h200.gpu


def test_paged_compute_weights_move_to_host_memory_and_onto_the_link():
    model = tiny_model(num_experts=16, layers=4)  # 4 MoE layers: the 2 buffers hold half of them
    _, expert, per_expert = count_parameters(model.config)
    resident = make_plan(model.config, OffloadConfig(tier="cpu"), tokens_per_step=64, micro_batch_tokens=16)
    paged = make_plan(model.config, OffloadConfig(tier="cpu", resident_weights="no"), tokens_per_step=64,
                      micro_batch_tokens=16)
    assert resident.gpu_bytes - paged.gpu_bytes == 2 * expert - 2 * 2 * (expert // 4) == expert  # 4 layers vs 2
    assert paged.host_bytes - resident.host_bytes == 2 * expert
    # 4 micro-batches x (forward + backward) x active experts per micro-batch, plus the step's write-back
    per_micro = 4 * 16 * (1 - (1 - 1 / 16) ** (16 * 2))  # 4 layers x expected active experts of 16 x top-2 rows
    extra = 2 * per_expert * (2 * 4 * per_micro + resident.active_experts)
    assert paged.moved_bytes - resident.moved_bytes == pytest.approx(extra)


def test_paged_compute_weights_are_the_last_resort_that_fits_a_smaller_gpu():
    """Qwen3-30B-A3B with plenty of host memory and disk but a 64 GiB GPU: its bf16 expert weights alone
    (57 GB) leave no room on the GPU, so only placements that page the compute weights from host memory fit;
    their load peak is the fp32 dense part and two layers of experts, and the host holds the weights."""
    config = ModelConfig.from_preset("qwen3-30b-a3b")
    dense, expert, _ = count_parameters(config)
    machine = Machine(gpu=64 * GiB, host=512 * GiB, disk=1024 * GiB)
    options = fit_options(config, machine, 2048)
    assert not any(c.plan.fits_all() for c in options if not c.paged_weights)
    choice = best_fit(config, machine, micro_batch_tokens=2048)
    assert choice is not None and choice.paged_weights and "resident_weights no" in choice.describe()
    n_moe = len(config.moe_layers)
    assert choice.plan.gpu_load_bytes == 4 * dense + int(2 * expert * 2 / n_moe)
    resident = next(c for c in options if not c.paged_weights and (c.tier, c.master, c.moments, c.layerwise_grads)
                    == (choice.tier, choice.master, choice.moments, choice.layerwise_grads))
    # the host holds the paged weights; and the masters, which resident weights hold instead (host_drops_masters)
    held = len(config.moe_layers) * config.num_experts * align_up(2 * count_parameters(config)[2], 64)
    assert choice.plan.host_bytes - resident.plan.host_bytes == 2 * expert + (
        held if choice.master in ("bf16_sr", "fp32_split") else 0)
    assert choice.plan.moved_bytes > resident.plan.moved_bytes  # the weights cross the link every micro-batch


def test_the_plan_follows_the_trained_experts(tmp_path):
    """model.train.routed_experts: expert state, host memory, checkpointed moments and bytes paged follow the
    trained share; a selection file not written yet plans full fine-tuning and says so."""
    from moetrain.offload.plan import plan_from_recipe

    config = ModelConfig.from_preset("deepseek-moe-16b")
    layers = list(config.moe_layers)
    sel = tmp_path / "experts.json"
    sel.write_text(json.dumps({"experts": {str(layer): list(range(13)) for layer in layers}}))
    recipe = {"model": {"preset": "deepseek-moe-16b", "offload": {"placement": {"tier": "cpu", "hot_cache_gb": 0}}},
              "data": {"seq_len": 2048, "micro_batch_size": 1}}
    caps = dict(gpu_capacity=139 * GiB, host_capacity=1024 * GiB, disk_free=1024 * GiB)
    full = plan_from_recipe(recipe, **caps)
    esft = plan_from_recipe({**recipe, "model": {**recipe["model"], "train": {"routed_experts": str(sel)}}}, **caps)
    missing = plan_from_recipe({**recipe, "model": {**recipe["model"], "train": {"routed_experts": "nope.json"}}},
                               **caps)
    share = 13 / 64
    state = dict((what, n) for tier, what, n in full.breakdown if tier == "host")["expert state (pinned)"]
    esft_state = dict((what, n) for tier, what, n in esft.breakdown if tier == "host")["expert state (pinned)"]
    assert esft_state == pytest.approx(share * state, rel=1e-9)
    assert esft.moved_bytes == pytest.approx(share * full.moved_bytes, rel=1e-9)
    assert full.host_bytes - esft.host_bytes == state - esft_state
    assert esft.compute_s < full.compute_s and esft.trained_experts == 13 * len(layers)
    assert f"routed experts training: {13 * len(layers)} of {64 * len(layers)} (20%" in esft.format()
    assert "routed experts training" not in full.format()
    assert missing.host_bytes == full.host_bytes and "nope.json is not here yet" in missing.format()
