"""Frozen routed experts (``model.train``) cost the offload engine nothing: no record in the store, no state, no
gradient, nothing paged or stepped, on every tier and with paged compute weights; the trained ones step exactly as
torch AdamW steps them; checkpoints still hold the whole model, and a resume is exact."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from offload_harness import OPTIM, batches, clone, max_diff, tiny_model, train

from moetrain.models.train_selection import apply_train_selection
from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig
from moetrain.optim import DenseAdamW
from moetrain.training.checkpoint import model_tensors

SELECTED = {0: [0, 3, 5, 9], 1: [2, 11]}  # the tiny model's two layers are MoE layers
ESFT = dict(embeddings=False, attention=False, norms=False, routers=False, shared_experts=False, dense_mlp=False,
            lm_head=False)
TIERS = {
    "cpu": dict(tier="cpu", gpu_slots=3),
    "cpu-step_on-cpu": dict(tier="cpu", step_on="cpu"),
    "nvme": dict(tier="nvme", gpu_slots=2, idle_experts="dense"),
    "paged-weights": dict(tier="cpu", gpu_slots=3, resident_weights="no"),
}


def selection(tmp_path, experts=SELECTED, **groups) -> dict:
    path = tmp_path / "experts.json"
    path.write_text(json.dumps({"format": "moetrain-expert-selection",
                                "experts": {str(k): v for k, v in experts.items()}}))
    return {**groups, "routed_experts": str(path)}


def offload_config(tmp_path, name: str) -> OffloadConfig:
    cfg = dict(TIERS[name])
    if cfg["tier"] == "nvme":
        (tmp_path / "swap").mkdir(exist_ok=True)
        cfg["nvme_path"] = str(tmp_path / "swap")
    return OffloadConfig(**cfg)


@pytest.mark.parametrize("groups", ["esft", "experts_and_dense"])
@pytest.mark.parametrize("tier", list(TIERS))
def test_frozen_experts_have_no_state_and_the_rest_equals_torch_adamw(tmp_path, tier, groups):
    train_sel = selection(tmp_path, **(ESFT if groups == "esft" else {}))
    base, data = tiny_model(), batches(steps=6, tokens=32)
    ref = clone(base)
    apply_train_selection(ref, train_sel)
    train(ref, DenseAdamW(ref, OPTIM), data, total=6,
          before_step=None if TIERS[tier].get("idle_experts") != "dense" else _dense_view)
    model = clone(base)
    apply_train_selection(model, train_sel)
    opt = build_optimizer(model, OPTIM, offload_config(tmp_path, tier))
    store = opt.store
    trained = {(layer, e) for layer, ids in SELECTED.items() for e in ids}
    assert set(store.records) == trained
    assert len(store.frozen) == 2 * 16 - len(trained)
    assert store.cpu_bytes + store.nvme_bytes == sum(r.state_bytes for r in store)
    paged, written, stepped = set(), set(), set()
    acquire = store_swapper_acquire = opt.swapper.acquire

    def spy_acquire(recs):
        paged.update(r.key for r in recs)
        return store_swapper_acquire(recs)

    opt.swapper.acquire = spy_acquire
    if opt.pager is not None:
        write = opt.pager.write
        opt.pager.write = lambda layer, e, *a, **k: (written.add((layer, e)), write(layer, e, *a, **k))[1]
    if opt.engine.cpu is not None:
        cpu_step = opt.engine.cpu.stepper.step
        opt.engine.cpu.stepper.step = lambda recs, *a, **k: (stepped.update(r.key for r in recs),
                                                             cpu_step(recs, *a, **k))[1]
    grads_seen: list[bool] = []

    def check_grads(m):
        grads_seen.append(all(p.grad is None for fx in store.frozen.values() for p in fx.params))

    figures = []
    train(model, opt, data, total=6, before_step=check_grads, on_step=lambda _: figures.append(opt.telemetry()))
    opt.finalize()
    assert acquire is not None and all(grads_seen)
    assert (paged | written | stepped) <= trained and (paged | stepped)  # something trained, nothing frozen moved
    frozen_params = {n for fx in store.frozen.values() for n in fx.names}
    start, ref_params = dict(base.named_parameters()), dict(ref.named_parameters())
    masters = dict(opt.named_master_tensors())  # every expert's weights (paged ones are placeholders in the model)
    assert masters.keys() == model.expert_parameter_names()
    for name, p in model.named_parameters():
        current = masters.get(name, p)
        if p.requires_grad:
            torch.testing.assert_close(current, ref_params[name].detach(), rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(current, start[name].detach()), f"{name} is frozen but changed"
    # telemetry: state bytes moved are whole trained records (a frozen expert has none to move)
    record = store.max_padded * 4
    for t in figures:
        assert t["offload/h2d_bytes"] % record == 0 and t["offload/h2d_bytes"] <= record * len(trained) * 2
    # a checkpoint's model part is the whole model: frozen experts from the parameters (or the pager)
    saved = opt.checkpoint_state()
    assert set(saved.expert_steps) == model.expert_parameter_names()
    assert all(saved.expert_steps[n] == 0 for n in frozen_params)
    tensors = dict(model_tensors(model, saved))
    assert len(tensors) == len(model.state_dict())
    assert not any(n.rsplit(".", 1)[0] in frozen_params for n, _ in opt.named_optimizer_tensors())
    opt.close()


def _dense_view(model) -> None:
    """idle_experts: dense is torch AdamW with zero gradients for the trained experts that got no tokens."""
    for name, p in model.named_parameters():
        if name in model.expert_parameter_names() and p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def test_every_routed_expert_frozen_leaves_an_empty_store(tmp_path):
    base, data = tiny_model(), batches(steps=3)
    model, ref = clone(base), clone(base)
    for m in (model, ref):
        apply_train_selection(m, {"routed_experts": "none", "embeddings": False})
    train(ref, DenseAdamW(ref, OPTIM), data, total=3)
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu"))
    assert not opt.store.records and opt.store.cpu_bytes == 0
    train(model, opt, data, total=3)
    assert max_diff(model, ref) == 0.0
    assert opt.telemetry()["offload/h2d_bytes"] == 0
    opt.close()


@pytest.mark.parametrize("tier", ["cpu", "paged-weights"])
def test_resume_with_a_selection_is_exact(tmp_path, tier):
    total, half = 8, 4
    train_sel = selection(tmp_path, **ESFT)
    base, data = tiny_model(), batches(steps=total, tokens=32)

    def start(model):
        apply_train_selection(model, train_sel)
        return build_optimizer(model, OPTIM, offload_config(tmp_path, tier))

    whole = clone(base)
    opt = start(whole)
    train(whole, opt, data, total=total)
    opt.finalize()
    whole_weights = dict(opt.named_master_tensors())
    opt.close()

    first = clone(base)
    opt = start(first)
    train(first, opt, data[:half * 2], total=total)
    meta = copy.deepcopy(opt.state_dict(include_expert_tensors=False))
    tensors = list(opt.named_master_tensors()) + list(opt.named_optimizer_tensors())
    dense = {n: p.detach().clone() for n, p in first.named_parameters() if n not in first.expert_parameter_names()}
    opt.close()

    second = tiny_model(seed=123)  # every expert starts elsewhere: the saved tensors put them back, frozen ones too
    second.load_state_dict(dense, strict=False)
    opt = start(second)
    opt.load_state_dict(meta)
    opt.load_expert_tensors(tensors)
    train(second, opt, data[half * 2:], start=half, total=total)
    opt.finalize()
    resumed = dict(opt.named_master_tensors())
    opt.close()
    assert resumed.keys() == whole_weights.keys()
    assert all(torch.equal(resumed[n], whole_weights[n]) for n in resumed)
    if tier == "cpu":
        assert max_diff(second, whole) == 0.0
