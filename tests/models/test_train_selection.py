"""``model.train``: parameter groups, frozen parameters (no gradient, no optimizer state, bit-identical after
training), frozen routers (aux loss reported only), and a selected-experts ``moetrain fit`` against a full model
whose other parameters are masked out of a plain ``torch.optim.AdamW``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moetrain
from moetrain.cli import main
from moetrain.config import ConfigError, ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.random_hf import preset_config, write_random_hf
from moetrain.models.train_selection import (
    GROUPS,
    apply_train_selection,
    parameter_group,
    resolve_train_selection,
)
from moetrain.optim import DenseAdamW, OptimizerConfig, clip_, global_grad_norm, lr_at, param_groups
from moetrain.training.data import TextDataModule

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "tiny"
PRESETS = ("tiny-deepseek-moe", "tiny-deepseek-v2", "tiny-deepseek-v3", "tiny-qwen2-moe", "tiny-qwen3-moe",
           "tiny-mixtral", "tiny-olmoe")
ESFT = dict(embeddings=False, attention=False, norms=False, routers=False, shared_experts=False, dense_mlp=False,
            lm_head=False)


def small(preset: str = "tiny-deepseek-moe", **overrides) -> MoEForCausalLM:
    return MoEForCausalLM(ModelConfig.from_preset(preset, vocab_size=64, num_hidden_layers=3, **overrides))


def write_selection(path: Path, experts: dict[int, list[int]]) -> str:
    path.write_text(json.dumps({"format": "moetrain-expert-selection", "experts": {str(k): v
                                                                                   for k, v in experts.items()}}))
    return str(path)


# ---------------------------------------------------------------------------------------------- groups
@pytest.mark.parametrize("preset", PRESETS)
def test_every_parameter_is_in_exactly_one_group(preset):
    model = small(preset)
    config = model.config
    seen = {g: 0 for g in GROUPS}
    for name, p in model.named_parameters():
        group, layer, expert = parameter_group(name, config.is_moe_layer)
        seen[group] += p.numel()
        assert (expert is not None) == (group == "routed_experts"), name
        if group in ("routers", "shared_experts", "routed_experts"):
            assert config.is_moe_layer(layer), name
        if group == "dense_mlp":
            assert not config.is_moe_layer(layer), name
    assert seen["routed_experts"] == config.param_counts()["expert"]
    assert sum(seen.values()) == model.num_parameters()
    assert seen["embeddings"] == seen["lm_head"] == 64 * config.hidden_size
    assert seen["routers"] == len(config.moe_layers) * config.num_experts * config.hidden_size
    assert (seen["shared_experts"] > 0) == (config.shared_width > 0)
    assert (seen["dense_mlp"] > 0) == (len(config.moe_layers) < config.num_hidden_layers)
    with pytest.raises(ConfigError, match="no model.train group"):
        parameter_group("model.layers.0.adapter.weight", config.is_moe_layer)


def test_esft_selection_freezes_all_but_the_listed_experts(tmp_path):
    model = small()
    path = write_selection(tmp_path / "sel.json", {1: [3, 7], 2: [0]})
    summary = apply_train_selection(model, {**ESFT, "routed_experts": path})
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for layer, e in ((1, 3), (1, 7), (2, 0))
                for proj in ("gate_proj", "up_proj", "down_proj")}
    assert trained == expected
    one_expert = 3 * model.config.hidden_size * model.config.moe_intermediate_size
    assert summary.trained == 3 * one_expert
    assert summary.trained + summary.frozen == model.num_parameters()
    assert summary.groups["routed_experts"] == (3 * one_expert, model.config.param_counts()["expert"] - 3 * one_expert)
    assert summary.routed_experts == {1: [3, 7], 2: [0]}  # layer 2 lists no expert: none trains
    assert summary.aux_loss == "reported"
    assert "frozen: embeddings" in summary.describe() and "3 routed experts" in summary.describe()


def test_all_touches_nothing():
    model = small()
    summary = apply_train_selection(model, "all")
    assert all(p.requires_grad for p in model.parameters()) and summary.frozen == 0 and not summary.hooks
    assert summary.aux_loss == "trained" and resolve_train_selection(None).is_all


def test_bad_selections(tmp_path):
    with pytest.raises(ConfigError, match="model.train='some'"):
        resolve_train_selection("some")
    with pytest.raises(ConfigError, match="unknown key.*router\\b"):
        resolve_train_selection({"router": False})
    with pytest.raises(ConfigError, match="selection file .*missing.json not found"):
        resolve_train_selection({"routed_experts": str(tmp_path / "missing.json")})
    (tmp_path / "nothing.json").write_text("{}")
    with pytest.raises(ConfigError, match="no 'experts' mapping"):
        resolve_train_selection({"routed_experts": str(tmp_path / "nothing.json")})
    with pytest.raises(ConfigError, match="nothing would train"):
        resolve_train_selection({**ESFT, "routed_experts": "none"})
    with pytest.raises(ConfigError, match="bias_update_speed"):
        resolve_train_selection({"bias_update_speed": -1.0})
    sel = write_selection(tmp_path / "sel.json", {0: [1]})
    with pytest.raises(ConfigError, match=r"layer\(s\) \[0\].*MoE layers are \[1, 2\]"):
        apply_train_selection(small(), {"routed_experts": sel})
    sel = write_selection(tmp_path / "sel.json", {1: [16]})
    with pytest.raises(ConfigError, match="expert 16.*16 routed experts"):
        apply_train_selection(small(), {"routed_experts": sel})
    with pytest.raises(ConfigError, match="ties its embeddings"):
        apply_train_selection(small(tie_word_embeddings=True), {"lm_head": False})
    with pytest.raises(ConfigError, match="only topk_method 'noaux_tc'"):
        apply_train_selection(small(), {"bias_update_speed": 0.001})


@pytest.mark.parametrize("experts", ["none", "file"])
@pytest.mark.parametrize("tier", ["none", "cpu", "nvme"])
def test_every_offload_tier_takes_a_partial_expert_selection(tmp_path, experts, tier):
    value = write_selection(tmp_path / "sel.json", {1: [0]}) if experts == "file" else "none"
    assert resolve_train_selection({"routed_experts": value}, offload_tier=tier).routed_experts == value
    assert resolve_train_selection({"routers": False}, offload_tier=tier).routers is False


def test_bias_update_speed_is_its_own_setting():
    model = small("tiny-deepseek-v3")
    assert model.config.bias_update_speed == 0
    assert apply_train_selection(model, {"routers": False, "bias_update_speed": 0.001}).bias_update_speed == 0.001
    model = small("tiny-deepseek-v3", bias_update_speed=0.002)
    assert apply_train_selection(model, {"routers": False}).bias_update_speed == 0.002  # null: the config's
    assert apply_train_selection(model, {"bias_update_speed": 0.0}).bias_update_speed == 0.0  # frozen


# ---------------------------------------------------------------------------------------------- frozen routers
def test_frozen_routers_report_the_aux_loss_without_a_gradient(randomize):
    ids = torch.randint(0, 64, (2, 10))
    reference = randomize(small())
    model = small()
    model.load_state_dict(reference.state_dict())
    apply_train_selection(model, {"routers": False})
    out, ref = model(ids, labels=ids), reference(ids, labels=ids)
    assert float(ref.aux_loss.detach()) > 0 and torch.equal(out.aux_loss, ref.aux_loss)  # reported: the same value
    assert out.loss.requires_grad and not out.aux_loss.requires_grad
    out.loss.backward()
    ref.ce_loss.backward()  # the gradient of cross-entropy alone
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if ".mlp.gate." in name:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------- optimizer state
def step_a_few(model: MoEForCausalLM, opt, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 16), generator=g)
        model(ids, labels=ids).loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step(1e-2)
        opt.zero_grad()


def test_frozen_parameters_get_no_gradient_no_state_and_stay_bit_identical(tmp_path, randomize):
    model = randomize(small())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sel = write_selection(tmp_path / "sel.json", {1: [2, 5], 2: [9]})
    apply_train_selection(model, {**ESFT, "attention": True, "routed_experts": sel})
    opt = DenseAdamW(model, OptimizerConfig(lr=1e-2, weight_decay=0.1))
    ids = torch.randint(0, 64, (2, 16))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    opt.zero_grad()
    step_a_few(model, opt)
    state = {id(p) for p in opt.opt.state}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert id(p) in state and not torch.equal(p, before[name]), name
        else:
            assert id(p) not in state, name
            assert torch.equal(p, before[name]), name  # bit-identical
    assert any(".experts.5." in n for n, p in model.named_parameters() if p.requires_grad)


def test_a_zero_gradient_is_not_freezing(randomize):
    """Why frozen experts are left out of AdamW rather than given zero gradients: AdamW still decays a
    zero-gradient weight, and its moments keep moving it after a step that had a gradient."""
    model = randomize(small())
    frozen = model.model.layers[1].mlp.experts[3].up_proj.weight
    before = frozen.detach().clone()
    opt = torch.optim.AdamW(param_groups(model.named_parameters(), 0.1), lr=1e-2)
    g = torch.Generator().manual_seed(6)
    for _ in range(2):
        ids = torch.randint(0, 64, (2, 16), generator=g)
        model(ids, labels=ids).loss.backward()
        frozen.grad = torch.zeros_like(frozen)  # the masked gradient
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert not torch.equal(frozen, before)


# ---------------------------------------------------------------------------------------------- moetrain fit
@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> Path:
    """A random 3-layer tiny DeepSeek-MoE model (fp32 Hugging Face directory) both runs start from."""
    out = tmp_path_factory.mktemp("init") / "tiny"
    write_random_hf(preset_config("tiny-deepseek-moe", layers=3, overrides={"vocab_size": 768}), out,
                    dtype="fp32", seed=11)
    return out


STEPS, SEQ, BATCH = 4, 32, 2
CASES = {
    # ESFT: the selected experts only, routers frozen (the aux loss reported only)
    "esft": {**ESFT},
    # selected experts with routers and attention, the rest frozen (the aux loss trains)
    "experts_routers_attention": {**ESFT, "routers": True, "attention": True},
}


def fit(run: Path, init: Path, *overrides: str) -> None:
    code = main(["fit", "--config", str(REPO / "recipes" / "tiny.yaml"), f"--model.init_from={init}",
                 "--model.config=null", f"--trainer.max_steps={STEPS}", f"--data.seq_len={SEQ}",
                 f"--data.micro_batch_size={BATCH}", f"--data.path={DATA / 'train.jsonl'}",
                 f"--data.tokenizer={DATA / 'tokenizer'}", "--data.val_path=null", "--trainer.accelerator=cpu",
                 f"--trainer.default_root_dir={run}", *overrides])
    assert code == 0


def masked_reference(init: Path, trained: set[str], aux: bool) -> dict[str, torch.Tensor]:
    """The full model (every parameter requires a gradient) trained with ``torch.optim.AdamW`` over the
    ``trained`` parameters only, clipped by their norm, on the recipe's data order and schedule."""
    model = moetrain.from_pretrained(init).train()
    named = [(n, p) for n, p in model.named_parameters() if n in trained]
    cfg = OptimizerConfig(lr=0.003, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, warmup_steps=5,
                          min_lr_ratio=0.1, max_grad_norm=1.0)
    opt = torch.optim.AdamW(param_groups(named, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    data = TextDataModule(path=str(DATA / "train.jsonl"), tokenizer=str(DATA / "tokenizer"), seq_len=SEQ,
                          micro_batch_size=BATCH, seed=0)
    data.setup("fit")
    batches = iter(data.train_dataloader())
    for step in range(STEPS):
        batch = next(batches)
        out = model(batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"),
                    document_ids=batch.get("document_ids"), return_logits=False)
        (out.loss if aux else out.ce_loss).backward()
        params = [p for _, p in named]
        clip_(params, global_grad_norm(params), cfg.max_grad_norm)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, STEPS)
        opt.step()
        model.zero_grad(set_to_none=True)
    return {n: p.detach() for n, p in model.named_parameters()}


TIERS = {  # the offload engine keeps state for the selected experts only (tests/offload/test_frozen_experts.py)
    "none": [],
    "cpu": ["--model.offload.placement.tier=cpu"],
    "nvme": ["--model.offload.placement.tier=nvme", "--model.offload.nvme.path={swap}"],
    "paged-weights": ["--model.offload.placement.tier=cpu", "--model.offload.placement.resident_weights=no"],
}


@pytest.mark.parametrize("case,tier", [(c, "none") for c in CASES] + [("esft", t) for t in TIERS if t != "none"]
                         + [("experts_routers_attention", "cpu")])
def test_selected_experts_fit_equals_a_masked_full_run(case, tier, tmp_path, init_dir, repo_cwd):
    sel = write_selection(tmp_path / "sel.json", {1: [0, 4, 9], 2: [2, 15]})
    selection = {**CASES[case], "routed_experts": sel}
    (tmp_path / "swap").mkdir()
    tiers = [arg.format(swap=tmp_path / "swap") for arg in TIERS[tier]]
    fit(tmp_path / "run", init_dir, "--model.train=" + json.dumps(selection), *tiers)
    start = moetrain.from_pretrained(init_dir)
    model = moetrain.from_pretrained(tmp_path / "run")
    trained = {n for n, p in model.named_parameters()
               if parameter_group(n, model.config.is_moe_layer)[0] != "routed_experts" and selection[
                   parameter_group(n, model.config.is_moe_layer)[0]]}
    trained |= {f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for layer, ids in
                {1: [0, 4, 9], 2: [2, 15]}.items() for e in ids for proj in ("gate_proj", "up_proj",
                                                                                     "down_proj")}
    reference = masked_reference(init_dir, trained, aux=selection["routers"])
    start_params = dict(start.named_parameters())
    moved = 0
    for name, p in model.named_parameters():
        if name in trained:
            torch.testing.assert_close(p, reference[name], rtol=0, atol=1e-6, msg=name)
            moved += not torch.equal(p, start_params[name])
        else:
            assert torch.equal(p, start_params[name]), f"{name} is frozen but changed"
    assert moved == len(trained)  # every trained parameter moved (the comparison is not between two no-ops)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1)) and all(m["aux_loss"] > 0 for m in metrics)
