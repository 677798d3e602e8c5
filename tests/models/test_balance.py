"""Auxiliary-loss-free balancing: the bias update equals its per-expert definition, moves a skewed router's load
toward balance, never touches gradients, freezes at speed 0, and the bias survives a checkpoint exactly."""

from __future__ import annotations

import torch

import moetrain
from moetrain.config import ModelConfig
from moetrain.models.balance import BiasBalancer, correction_biases, update_correction_bias
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf import export_hf
from moetrain.models.router import TopKRouter
from moetrain.shards import read_weight_map


def test_update_equals_the_per_expert_rule():
    bias = torch.randn(8)
    load = torch.tensor([10, 0, 3, 3, 7, 1, 0, 8])
    expected = bias.clone()
    mean = load.float().mean().item()
    for e in range(8):  # overloaded experts go down by the speed, underloaded ones up, balanced ones stay
        expected[e] += 0.01 * (1 if load[e] < mean else -1 if load[e] > mean else 0)
    update_correction_bias(bias, load, 0.01)
    torch.testing.assert_close(bias, expected, rtol=0, atol=0)


def _imbalance(counts: torch.Tensor) -> float:
    return (counts.float().max() / counts.float().mean()).item()


def test_bias_update_moves_a_skewed_router_toward_balance():
    cfg = ModelConfig.from_preset("tiny-deepseek-v3", hidden_size=32, num_experts=8, n_group=4, topk_group=2,
                                  bias_update_speed=0.005)
    router = TopKRouter(cfg)
    with torch.no_grad():
        router.weight.normal_(0, 0.1)
        router.weight[:2] += 0.5  # experts 0 and 1 attract most tokens
    x = torch.randn(512, 32).abs()  # positive inputs make the skew systematic
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].mlp = torch.nn.Module()
    model.layers[0].mlp.gate = router
    balancer = BiasBalancer(model, speed=cfg.bias_update_speed)
    assert list(balancer.biases) == [0]
    with torch.no_grad():
        start = _imbalance(router(x, batch_size=1).counts)
        for _ in range(150):
            for chunk in x.chunk(2):  # two micro-batches per optimizer step
                balancer.observe({0: router(chunk, batch_size=1)})
            balancer.step()
        end = _imbalance(router(x, batch_size=1).counts)
    assert start > 2.5, f"the router should start skewed (max/mean load {start:.2f})"
    # a fixed-size sign step keeps oscillating around balance, so ask for the skew to be more than halved
    assert end < 0.5 * start, f"max/mean load went from {start:.2f} to {end:.2f}"
    assert router.e_score_correction_bias[:2].max() < 0 < router.e_score_correction_bias[2:].max()
    stats = balancer.stats()
    assert stats["load_max_over_mean"] < 0.5 * start and stats["bias_abs_max"] > 0


def _tiny_v3(speed: float) -> MoEForCausalLM:
    cfg = ModelConfig.from_preset("tiny-deepseek-v3", vocab_size=64, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=3, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
                                  qk_rope_head_dim=8, v_head_dim=8, moe_intermediate_size=16, num_experts=8,
                                  bias_update_speed=speed)
    return MoEForCausalLM(cfg)


def test_bias_update_leaves_gradients_untouched_and_speed_zero_freezes():
    model = _tiny_v3(0.01)
    ids = torch.randint(0, 64, (2, 16))
    balancer = BiasBalancer(model)
    out = model(ids, labels=ids)
    out.loss.backward()
    balancer.observe(out.routings)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    before = {k: b.clone() for k, b in correction_biases(model).items()}
    balancer.step()
    after = correction_biases(model)
    assert sorted(after) == model.config.moe_layers
    for layer in after:
        assert not after[layer].requires_grad and after[layer].grad is None
        assert (after[layer] - before[layer]).abs().max() == 0.01  # every expert moved by the speed or stayed
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(grads)
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.equal(p.grad, grads[n]), n
    assert "e_score_correction_bias" not in " ".join(n for n, _ in model.named_parameters())

    frozen = _tiny_v3(0.0)
    balancer = BiasBalancer(frozen)
    assert not balancer.active
    balancer.observe(frozen(ids).routings)
    balancer.step()
    assert all(b.abs().max() == 0 for b in correction_biases(frozen).values())


def test_resume_restores_the_bias_exactly(tmp_path):
    model = _tiny_v3(0.003)
    balancer = BiasBalancer(model)
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        for _ in range(5):
            balancer.observe(model(ids).routings)
            balancer.step()
    biases = {k: b.clone() for k, b in correction_biases(model).items()}
    assert all(b.abs().max() > 0 for b in biases.values())
    weight_map = export_hf(model, tmp_path / "ckpt", dtype=torch.bfloat16)
    for layer in model.config.moe_layers:
        assert f"model.layers.{layer}.mlp.gate.e_score_correction_bias" in weight_map
    assert set(read_weight_map(tmp_path / "ckpt")) == set(weight_map)
    for dtype in (torch.float32, torch.bfloat16):
        restored = moetrain.from_pretrained(tmp_path / "ckpt", dtype=dtype)
        for layer, bias in correction_biases(restored).items():
            assert bias.dtype == torch.float32
            assert torch.equal(bias, biases[layer]), f"layer {layer} bias changed through the checkpoint"
    # a plain state-dict round trip (what an in-process resume does) is exact too
    fresh = _tiny_v3(0.003)
    fresh.load_state_dict(model.state_dict())
    for layer, bias in correction_biases(fresh).items():
        assert torch.equal(bias, biases[layer])
