"""The step's routing counts on the host: from the routing trace's copies (no wait for backward's end), equal to the
device sums; the device sums when counts came from outside the trace (another rank's)."""

from __future__ import annotations

import torch
from offload_harness import OPTIM, tiny_model

from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig


def _after_two_micro_batches(**offload):
    model = tiny_model(num_experts=16, layers=3)
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", gpu_slots=4, **offload))
    for index in range(2):
        opt.begin_micro_batch(index, 2, 1e-3)
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(index))
        model(ids, labels=ids).loss.backward()
    return opt, opt.engine


def _device_sums(engine) -> torch.Tensor:
    return torch.stack([engine.counts[layer] for layer in engine.store.layers]).cpu()


def test_step_counts_come_from_the_trace(monkeypatch):
    opt, engine = _after_two_micro_batches()
    expected = _device_sums(engine)
    assert expected.sum() > 0
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    engine.begin_step(1e-3)  # no device read: the trace's host copies
    monkeypatch.undo()
    assert engine._counts_host.dtype == torch.int64 and torch.equal(engine._counts_host, expected)
    opt.clip_grad_norm_(1.0)
    opt.step(1e-3)
    assert not engine.counts_beyond_trace and all(int(c.sum()) == 0 for c in engine.counts.values())
    opt.close()


def test_counts_from_outside_the_trace_are_read_from_the_device():
    opt, engine = _after_two_micro_batches()
    layer = engine.store.layers[0]
    extra = torch.zeros_like(engine.counts[layer])
    extra[3] = 5  # another rank routed 5 tokens to expert 3
    opt.add_routed_counts(layer, extra)
    expected = _device_sums(engine)
    engine.begin_step(1e-3)
    assert torch.equal(engine._counts_host, expected) and engine._counts_host[0, 3] >= 5
    opt.clip_grad_norm_(1.0)
    opt.step(1e-3)
    opt.close()


def test_without_prefetch_the_device_sums_are_read():
    opt, engine = _after_two_micro_batches(prefetch=False)
    expected = _device_sums(engine)
    engine.begin_step(1e-3)
    assert torch.equal(engine._counts_host, expected)
    opt.clip_grad_norm_(1.0)
    opt.step(1e-3)
    opt.close()
