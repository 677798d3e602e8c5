"""``model.activation_checkpointing``: decoder layers recomputed in backward. Training must not change
(the same ops run again on the same inputs), and the offload engine must see each routing once: the
re-run forward inside backward neither doubles the routing counts nor the look-ahead's accounting, with
resident or paged compute weights.
"""

from __future__ import annotations

import pytest
from offload_harness import OPTIM, batches, clone, max_diff, tiny_model, train

from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig
from moetrain.optim import DenseAdamW

STEPS = 8


def _checkpointed(model):
    model.set_activation_checkpointing(True)
    return model


@pytest.fixture(scope="module")
def setup():
    base, data = tiny_model(layers=3), batches(steps=STEPS)
    ref = clone(base)
    train(ref, DenseAdamW(ref, OPTIM), data, total=STEPS)
    return base, data, ref


def test_checkpointed_layers_train_like_stored_activations(setup):
    base, data, ref = setup
    model = _checkpointed(clone(base))
    train(model, DenseAdamW(model, OPTIM), data, total=STEPS)
    assert max_diff(ref, base) > 1e-2
    assert max_diff(model, ref) <= 1e-6


def _offload_run(base, data, checkpointed: bool, **offload):
    model = clone(base)
    if checkpointed:
        _checkpointed(model)
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", gpu_slots=4, **offload))
    seen = []
    train(model, opt, data, total=STEPS, on_step=lambda _: seen.append(opt.telemetry()))
    opt.finalize()
    values = {n: p.detach().clone() for n, p in model.named_parameters() if n not in model.expert_parameter_names()}
    values.update({n: t.clone() for n, t in opt.named_master_tensors()})
    opt.close()
    return values, seen


@pytest.mark.parametrize("resident_weights", ["yes", "no"])
def test_offload_engine_sees_each_routing_once(setup, resident_weights):
    base, data, ref = setup
    plain, plain_seen = _offload_run(base, data, False, resident_weights=resident_weights)
    values, seen = _offload_run(base, data, True, resident_weights=resident_weights)
    params = dict(ref.named_parameters())
    assert max((values[n] - params[n].detach()).abs().max().item() for n in params) <= 1e-6
    counted = ("offload/tokens_per_expert_mean", "offload/tokens_per_expert_max", "offload/lookahead_precision",
               "offload/lookahead_recall", "offload/active_experts/layer0")
    for a, b in zip(plain_seen, seen, strict=True):
        assert {k: a[k] for k in counted} == {k: b[k] for k in counted}
    if resident_weights == "no":  # recomputation fetches the layer again, never the layer after it
        assert sum(t["offload/weights_prefetched_rows"] for t in seen) == \
            sum(t["offload/weights_prefetched_rows"] for t in plain_seen)
