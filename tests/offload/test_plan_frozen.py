"""The planner counts only what trains in the dense part too: a dense ``model.train`` group that is frozen
(embeddings, attention, norms, routers, shared experts, dense MLPs, LM head) has its fp32 weight on the GPU but no
gradient and no AdamW moments, no moments in a checkpoint, and no weight-gradient FLOPs in the compute line. Each
count is checked against a real model: its groups' parameters, what it holds after a step, and what a save writes."""

from __future__ import annotations

import dataclasses

import pytest
from offload_harness import OPTIM, batches, tiny_model, train
from test_plan_disk import tensor_bytes

from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.train_selection import TrainSelection, apply_train_selection
from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig
from moetrain.offload.plan import (
    DENSE_GROUPS,
    GiB,
    Storage,
    checkpoint_bytes,
    count_parameters,
    dense_group_params,
    frozen_dense_groups,
    make_plan,
    plan_from_recipe,
    sustained_tflops,
)
from moetrain.training.checkpoint import save_checkpoint

TINY = ["tiny-deepseek-moe", "tiny-deepseek-v2", "tiny-deepseek-v3", "tiny-mixtral", "tiny-olmoe", "tiny-qwen2-moe",
        "tiny-qwen3-moe"]
ESFT = {g: False for g in DENSE_GROUPS}


@pytest.mark.parametrize("preset", TINY)
@pytest.mark.parametrize("tied", [False, True])
def test_dense_groups_are_the_models(preset, tied):
    """Each group's count from the config equals the parameters ``model.train`` puts in that group."""
    config = ModelConfig.from_preset(preset, tie_word_embeddings=tied)
    model = MoEForCausalLM(config)
    summary = apply_train_selection(model, dict(ESFT, lm_head=False))
    counted = dense_group_params(config)
    assert counted == {g: sum(summary.groups[g]) for g in DENSE_GROUPS}
    assert sum(counted.values()) == count_parameters(config)[0]


def test_the_frozen_groups_of_a_recipe():
    assert frozen_dense_groups("all") == frozen_dense_groups(None) == ()
    assert frozen_dense_groups({"routers": False, "attention": True, "routed_experts": "x.json"}) == ("routers",)
    assert frozen_dense_groups(TrainSelection(lm_head=False, embeddings=False)) == ("embeddings", "lm_head")
    assert frozen_dense_groups(ESFT) == DENSE_GROUPS


def _rows(plan, tier: str = "gpu") -> dict[str, int]:
    return {what: n for t, what, n in plan.breakdown if t == tier}


@pytest.mark.parametrize("tier", ["cpu", "none"])
def test_frozen_dense_groups_hold_weights_only(tmp_path, tier):
    """The plan's dense rows equal the bytes a tiny model holds after a step: fp32 weights of every dense parameter,
    fp32 gradients and two fp32 moments of the trained ones only; a checkpoint holds the trained ones' moments."""
    frozen = {"norms": False, "routers": False, "embeddings": False, "lm_head": False}  # attention trains
    model = tiny_model(num_experts=16)
    apply_train_selection(model, frozen)
    off = OffloadConfig(tier=tier, gpu_slots=4)
    opt = build_optimizer(model, OPTIM, off)
    experts = model.expert_parameter_names()
    dense_params = [p for n, p in model.named_parameters() if n not in experts]
    grads: list[int] = []

    def measure(_model) -> None:
        grads.append(sum(4 * p.numel() for p in dense_params if p.grad is not None))

    data = batches(steps=2, tokens=256)  # 256 tokens x top-2: every expert steps
    train(model, opt, data, total=2, before_step=measure)
    dense_opt = opt.dense if hasattr(opt, "dense") else opt.opt  # the offload engine's dense AdamW, or the one
    held = {id(p) for p in dense_params}
    moments = sum(t.numel() * t.element_size() for p, state in dense_opt.state.items() if id(p) in held
                  for k, t in state.items() if k in ("exp_avg", "exp_avg_sq"))
    weights = sum(4 * p.numel() for p in dense_params)
    plan = make_plan(model.config, off, 256, gpu_capacity=GiB, host_capacity=GiB, disk_free=GiB,
                     frozen_groups=tuple(g for g in DENSE_GROUPS if g in frozen),
                     storage=Storage(checkpoints=1, checkpoints_what="one"))
    rows = _rows(plan)
    trained = sum(p.numel() for p in dense_params if p.requires_grad)
    assert 0 < trained < sum(p.numel() for p in dense_params)
    assert rows["dense weights, grads, AdamW moments (fp32)"] == 16 * trained == weights - 4 * (
        sum(p.numel() for p in dense_params) - trained) + grads[-1] + moments
    assert rows["frozen dense weights (fp32; no grads, no moments)"] == weights - 4 * trained
    assert plan.frozen_dense_params == sum(p.numel() for p in dense_params) - trained
    assert "dense frozen: embeddings, norms, routers, lm_head" in plan.format()
    # a checkpoint: every weight, the moments of what trains
    ckpt = save_checkpoint(tmp_path, 2, model, optimizer=opt)
    dense, expert, _ = count_parameters(model.config)
    buffers = sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
                  if name not in dict(model.named_parameters()))
    one = checkpoint_bytes(dense, expert, offload=off, trained_dense=trained)
    assert tensor_bytes(ckpt) == one + buffers
    assert _rows(plan, "disk")["checkpoints: 1 x " + f"{one / GiB:.2f} GiB"] == one
    if hasattr(opt, "close"):
        opt.close()


def test_the_recipe_plan_leaves_frozen_dense_groups_out():
    """DeepSeek-MoE-16B with ESFT's frozen dense part: 12 B/param less on the GPU (fp32 weight only), 8 B/param
    less a checkpoint, and the compute line without the frozen matrices' weight-gradient FLOPs; a recipe that
    trains everything plans as before."""
    recipe = {"model": {"preset": "deepseek-moe-16b", "offload": {"placement": {"tier": "cpu", "hot_cache_gb": 0}}},
              "data": {"seq_len": 2048, "micro_batch_size": 1}}
    caps = dict(gpu_capacity=139 * GiB, host_capacity=1024 * GiB, disk_free=1024 * GiB)
    full = plan_from_recipe(recipe, **caps)
    esft = plan_from_recipe({**recipe, "model": {**recipe["model"], "train": ESFT}}, **caps)
    routers = plan_from_recipe({**recipe, "model": {**recipe["model"], "train": {"routers": False}}}, **caps)
    config = ModelConfig.from_preset("deepseek-moe-16b")
    dense = count_parameters(config)[0]
    groups = dense_group_params(config)
    assert full.gpu_bytes - esft.gpu_bytes == 12 * dense
    assert "dense weights, grads, AdamW moments (fp32)" not in _rows(esft)
    assert _rows(esft)["frozen dense weights (fp32; no grads, no moments)"] == 4 * dense
    assert full.gpu_bytes - routers.gpu_bytes == 12 * groups["routers"]
    assert full.compute_s - esft.compute_s == pytest.approx(2 * dense * 2048 / (sustained_tflops(2048) * 1e12))
    assert full.compute_s - routers.compute_s == pytest.approx(
        2 * groups["routers"] * 2048 / (sustained_tflops(2048) * 1e12))
    assert full.frozen_groups == () and "dense frozen" not in full.format()
    assert "dense frozen: embeddings, attention, norms, routers, shared_experts, dense_mlp, lm_head" in esft.format()
    full_ckpt, esft_ckpt = ({w: n for w, n in _rows(p, "disk").items() if w.startswith("checkpoints:")}
                            for p in (full, esft))
    saves = int(next(iter(full_ckpt)).split()[1])  # "checkpoints: N x ... GiB"
    assert sum(full_ckpt.values()) - sum(esft_ckpt.values()) == 8 * dense * saves


def test_a_frozen_group_the_model_lacks_changes_nothing():
    """Qwen3-30B-A3B has no shared experts and no dense MLP: freezing them is planned as nothing frozen."""
    config = ModelConfig.from_preset("qwen3-30b-a3b")
    off = OffloadConfig(tier="cpu", hot_cache_gb=0)
    plan = make_plan(config, off, 2048, gpu_capacity=139 * GiB, host_capacity=1024 * GiB, disk_free=1024 * GiB)
    none = make_plan(config, off, 2048, gpu_capacity=139 * GiB, host_capacity=1024 * GiB, disk_free=1024 * GiB,
                     frozen_groups=("shared_experts", "dense_mlp"))
    assert dataclasses.asdict(plan) == dataclasses.asdict(none)


def test_frozen_experts_without_a_tier_hold_weights_only():
    """Tier none keeps every expert's fp32 weight on the GPU, and gradients and moments only for those that train."""
    config = ModelConfig.from_preset("olmoe-1b-7b")
    _, expert, per_expert = count_parameters(config)
    total = len(config.moe_layers) * config.num_experts
    off = OffloadConfig(tier="none")
    full = _rows(make_plan(config, off, 2048, gpu_capacity=GiB, host_capacity=GiB, disk_free=GiB))
    share = _rows(make_plan(config, off, 2048, gpu_capacity=GiB, host_capacity=GiB, disk_free=GiB,
                            trained_experts=total // 4))
    assert full["experts: weights, grads, moments (fp32)"] == 16 * expert
    assert share["experts: weights (fp32), grads and moments of the trained ones"] == (
        4 * expert + 12 * per_expert * (total // 4))
