"""A layer whose router is frozen (``model.train: {routers: false}``) is stepped under backward like one whose
router trains: the engine is told by the gradient of the MoE block's input (``MoEBlock.notify_backward``), not
by a router-weight hook (there is none: the router accumulates no gradient) nor by the routed experts'
parameters (their gradients need not be accumulated into them). The result still equals torch AdamW."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from offload_harness import OPTIM, batches, clone, max_diff, tiny_model, train

from moetrain.models.train_selection import apply_train_selection
from moetrain.offload import build_optimizer, schedule
from moetrain.offload.config import OffloadConfig
from moetrain.optim import DenseAdamW

NO_CLIP = dataclasses.replace(OPTIM, max_grad_norm=0.0)  # clipping would keep every step in step()
FROZEN_ROUTERS = {"routers": False}
# everything before layer 0's MoE block frozen: its input needs no gradient, so only layer 1 can signal
ESFT = dict(embeddings=False, attention=False, norms=False, routers=False, shared_experts=False, dense_mlp=False,
            lm_head=False)


def _run(base, data, groups, offload: dict, *, checkpointed: bool = False, impl: str = "loop"):
    """Train a copy of ``base`` with the offload engine; returns it, its optimizer (closed) and the layers stepped
    under backward per step."""
    model = clone(base)
    if groups is not None:
        apply_train_selection(model, groups)
    model.set_activation_checkpointing(checkpointed)  # the input's hook is set in the first pass, fires in the re-run
    model.set_expert_impl(impl)  # grouped: the experts' gradients go to stacked per-layer buffers, not the parameters
    opt = build_optimizer(model, NO_CLIP, OffloadConfig(**offload))
    early: list[float] = []
    train(model, opt, data, cfg=NO_CLIP, total=len(data) // 2,
          on_step=lambda _: early.append(opt.telemetry()["offload/layers_stepped_in_backward"]))
    opt.finalize()
    frozen_router = groups is not None and not groups.get("routers", True)
    assert all(bool(b.backward_sinks) == frozen_router for b in model.moe_blocks())
    opt.close()
    assert not any(b.backward_sinks for b in model.moe_blocks())  # close removed the signal
    return model, early


@pytest.mark.parametrize("name, groups, early", [
    ("routers", FROZEN_ROUTERS, 2),
    ("routers-checkpointed", FROZEN_ROUTERS, 2),
    ("esft", ESFT, 1),
    ("trained-routers", None, 2),
])
def test_a_frozen_router_layer_is_stepped_under_backward(name, groups, early):
    steps = 4
    base, data = tiny_model(), batches(steps=steps, tokens=16)
    ref = clone(base)
    if groups is not None:
        apply_train_selection(ref, groups)
    train(ref, DenseAdamW(ref, NO_CLIP), data, cfg=NO_CLIP, total=steps)
    model, early_per_step = _run(base, data, groups, dict(tier="cpu", gpu_slots=3),
                                 checkpointed=name.endswith("checkpointed"))
    assert early_per_step == [early] * steps
    assert max_diff(model, ref) <= 1e-6


@pytest.mark.parametrize("name, offload, impl", [
    ("step_on-cpu", dict(tier="cpu", step_on="cpu"), "loop"),
    ("grouped", dict(tier="cpu", gpu_slots=3), "grouped"),
])
def test_a_frozen_router_layer_is_stepped_under_backward_on_every_path(monkeypatch, name, offload, impl):
    """``step_on: cpu`` (the CPU share's AdamW, which rounds unlike torch's CPU loop) and the grouped expert GEMM
    (whose weight gradients go to stacked per-layer buffers; it sums in another order than the reference's loop):
    stepped under backward, the result equals the same engine stepping every layer in step()."""
    base, data = tiny_model(), batches(steps=4, tokens=16)
    model, early = _run(base, data, FROZEN_ROUTERS, offload, impl=impl)
    assert early == [2] * 4
    monkeypatch.setattr(schedule, "steps_under_backward", lambda *a, **k: False)
    late, never = _run(base, data, FROZEN_ROUTERS, offload, impl=impl)
    assert never == [0] * 4
    assert max_diff(model, late) <= 1e-6


def test_the_signal_fires_once_per_backward_after_the_layer():
    """The sink hears each layer once per backward, deepest first, and not in evaluation or recomputation."""
    model = tiny_model()
    apply_train_selection(model, FROZEN_ROUTERS)
    model.set_activation_checkpointing(True)
    heard: list[int] = []

    class Sink:
        def backward_done(self, layer: int) -> None:
            heard.append(layer)

    handles = [b.notify_backward(Sink()) for b in model.moe_blocks()]
    ids = batches(steps=1, accum=1, tokens=8)[0]
    model.train()
    model(ids, labels=ids).loss.backward()
    assert heard == [1, 0]
    model.eval()
    with torch.no_grad():
        model(ids)
    assert heard == [1, 0]
    for h in handles:
        h.remove()
    model.train()
    model(ids, labels=ids).loss.backward()
    assert heard == [1, 0]
