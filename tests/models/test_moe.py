"""The MoE parts against references that need no trust in them: a dense SwiGLU, a per-token loop, direct
formulas for the router losses, and invariance to what padding holds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.experts import RoutedExperts, SwiGLU
from moetrain.models.moe import MoEBlock
from moetrain.models.router import Routing

H, WIDTH = 32, 24


def _cfg(**kw) -> ModelConfig:
    base = dict(family="olmoe", vocab_size=64, hidden_size=H, intermediate_size=WIDTH, num_hidden_layers=2,
                num_attention_heads=4, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=WIDTH,
                qk_norm="full", aux_loss="switch", aux_loss_coef=0.01)
    return ModelConfig(**{**base, **kw})


def _routing(num_tokens: int, num_experts: int, k: int, avoid: tuple[int, ...] = ()) -> Routing:
    """Random distinct top-k choices per token (never an expert in ``avoid``) with random weights."""
    allowed = torch.tensor([e for e in range(num_experts) if e not in avoid])
    idx = torch.stack([allowed[torch.randperm(len(allowed))[:k]] for _ in range(num_tokens)])  # (T, k)
    weight = torch.rand(num_tokens, k)
    counts = torch.zeros(num_experts, dtype=torch.int64).scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel(),
                                                                                                      dtype=torch.int64))
    return Routing(topk_idx=idx, topk_weight=weight, counts=counts, logits=torch.zeros(num_tokens, num_experts),
                   aux_loss=torch.zeros(()))


IMPLS = ("loop", "grouped")  # torch._grouped_mm runs on the CPU too: the grouped path is held to the same references


@pytest.mark.parametrize("impl", IMPLS)
def test_one_expert_top1_equals_dense_swiglu(randomize, impl):
    cfg = _cfg(num_experts=1, num_experts_per_tok=1, aux_loss="none")
    block = randomize(MoEBlock(cfg, layer_idx=0))
    block.experts.impl = impl
    dense = SwiGLU(H, WIDTH)
    dense.load_state_dict(block.experts[0].state_dict())
    x = torch.randn(3, 5, H, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_(True)
    out, routing = block(x)
    ref = dense(x_dense)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_dense.grad, atol=1e-6, rtol=1e-6)
    for name, p in block.experts[0].named_parameters():
        torch.testing.assert_close(p.grad, dense.get_parameter(name).grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_dispatch_and_combine_equal_a_per_token_loop(randomize, impl):
    experts = randomize(RoutedExperts(6, H, WIDTH, impl=impl))
    x = torch.randn(20, H, requires_grad=True)
    routing = _routing(20, 6, 3)
    out = experts(x, routing)
    # naive: every token visits its chosen experts one by one, through a copy of the experts
    reference = [SwiGLU(H, WIDTH) for _ in range(6)]
    for ref_expert, expert in zip(reference, experts, strict=True):
        ref_expert.load_state_dict(expert.state_dict())
    x_ref = x.detach().clone().requires_grad_(True)
    rows = []
    for t in range(20):
        acc = torch.zeros(H)
        for j in range(3):
            acc = acc + routing.topk_weight[t, j] * reference[int(routing.topk_idx[t, j])](x_ref[t])
        rows.append(acc)
    ref = torch.stack(rows)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    for ref_expert, expert in zip(reference, experts, strict=True):  # weight gradients too, expert by expert
        for name, p in expert.named_parameters():
            torch.testing.assert_close(p.grad, ref_expert.get_parameter(name).grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_idle_expert_gets_no_gradient(randomize, impl):
    """The loop leaves an idle expert's grad None (torch AdamW then skips it); the grouped GEMM computes every
    expert's weight gradient at once, so an idle one gets zeros (the offload engine's idle_experts rule)."""
    experts = randomize(RoutedExperts(6, H, WIDTH, impl=impl))
    routing = _routing(16, 6, 2, avoid=(1, 4))
    experts(torch.randn(16, H), routing).pow(2).sum().backward()
    for e, expert in enumerate(experts):
        grads = [p.grad for p in expert.parameters()]
        if e in (1, 4):
            idle = all(g is None for g in grads) if impl == "loop" else all(g.abs().sum() == 0 for g in grads)
            assert idle, f"idle expert {e} got a gradient"
        else:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), f"expert {e} got no gradient"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("frozen", [(), (0, 3), tuple(range(6))])
def test_frozen_experts_get_no_gradient_and_change_nothing_else(randomize, impl, frozen, monkeypatch):
    """Frozen experts (requires_grad off) get no gradient, and the input and trained experts' gradients equal those
    of the same experts all trained (the grouped path skips the frozen experts' weight-gradient GEMMs: every one
    of them when the whole layer is frozen)."""
    import moetrain.models.expert_grads as expert_grads

    full = randomize(RoutedExperts(6, H, WIDTH, impl=impl))
    part = RoutedExperts(6, H, WIDTH, impl=impl)
    part.load_state_dict(full.state_dict())
    for e in frozen:
        part[e].requires_grad_(False)
    routing = _routing(16, 6, 2, avoid=(4,))
    x = torch.randn(16, H)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    full(xs[0], routing).pow(2).sum().backward()
    weight_grads = []  # the weight-gradient GEMMs the grouped backward runs: (E, ...) results, 3 per layer pass
    real = torch._grouped_mm

    def counting(a, b, offs=None):
        if a.dim() == 2 and b.dim() == 2:  # (rows' features)^T x rows: a weight gradient per group
            weight_grads.append(1)
        return real(a, b, offs=offs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    part(xs[1], routing).pow(2).sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=0, atol=0)
    for e in range(6):
        for p_full, p_part in zip(full[e].parameters(), part[e].parameters(), strict=True):
            if e in frozen:
                assert p_part.grad is None, f"frozen expert {e} got a gradient"
            elif p_full.grad is None:
                assert p_part.grad is None
            else:
                torch.testing.assert_close(p_part.grad, p_full.grad, rtol=0, atol=0)
    if impl == "grouped":
        assert len(weight_grads) == (0 if len(frozen) == 6 else 3)
    assert expert_grads.trained_experts(list(part.parameters())) == [e for e in range(6) if e not in frozen]


def _switch_loss_direct(logits: torch.Tensor, k: int) -> torch.Tensor:
    """E * sum_e (share of assignments to e) * (mean probability of e), from loops over tokens."""
    probs = logits.softmax(-1)
    t_count, e_count = probs.shape
    chosen = torch.topk(probs, k, dim=-1).indices.tolist()
    total = probs.new_zeros(())
    for e in range(e_count):
        f_e = sum(row.count(e) for row in chosen) / t_count
        p_e = sum(probs[t, e] for t in range(t_count)) / t_count
        total = total + f_e * p_e
    return e_count * total


def test_aux_loss_gradient_reaches_the_router(randomize):
    cfg = _cfg(aux_loss_coef=0.5)
    block = randomize(MoEBlock(cfg, layer_idx=0), std=0.3)
    x = torch.randn(2, 8, H)
    _, routing = block(x)
    (g_ours,) = torch.autograd.grad(routing.aux_loss, block.gate.weight)
    direct = cfg.aux_loss_coef * _switch_loss_direct(F.linear(x.reshape(-1, H), block.gate.weight), 2)
    torch.testing.assert_close(routing.aux_loss, direct, atol=1e-7, rtol=1e-6)
    (g_ref,) = torch.autograd.grad(direct, block.gate.weight)
    assert g_ours.abs().max() > 1e-4
    torch.testing.assert_close(g_ours, g_ref, atol=1e-8, rtol=1e-5)


def test_router_z_loss_equals_direct_formula(randomize):
    cfg = _cfg(aux_loss="none", router_z_loss_coef=0.1)
    block = randomize(MoEBlock(cfg, layer_idx=0), std=0.3)
    x = torch.randn(2, 5, H)
    valid = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    _, routing = block(x, valid)
    logits = F.linear(x.reshape(-1, H), block.gate.weight)
    real = [t for t in range(10) if valid.reshape(-1)[t]]
    z = sum(torch.log(sum(torch.exp(logits[t, e]) for e in range(cfg.num_experts))) ** 2 for t in real) / len(real)
    torch.testing.assert_close(routing.aux_loss, cfg.router_z_loss_coef * z, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize(
    ("family", "aux", "z"),
    [("olmoe", "switch", 0.0), ("olmoe", "none", 0.01), ("deepseek_moe", "seq", 0.0), ("deepseek_moe", "token", 0.0)],
)
def test_padding_does_not_change_the_aux_loss(family, aux, z, randomize):
    extra = dict(qk_norm="none", num_shared_experts=1) if family == "deepseek_moe" else {}
    cfg = _cfg(family=family, aux_loss=aux, router_z_loss_coef=z, **extra)
    model = randomize(MoEForCausalLM(cfg).eval(), std=0.2)
    ids = torch.randint(0, cfg.vocab_size, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    other = ids.clone()
    other[mask == 0] = (ids[mask == 0] + 7) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(ids, attention_mask=mask), model(other, attention_mask=mask)
        # Padding changes which rows each expert's GEMM sees, so the per-expert sums may round differently
        # (a BLAS kernel picks its blocking by row count): equal up to fp32 rounding, not bit for bit.
        eps = torch.finfo(torch.float32).eps
        torch.testing.assert_close(a.aux_loss, b.aux_loss, atol=0, rtol=64 * eps)
        torch.testing.assert_close(a.logits[mask.bool()], b.logits[mask.bool()], atol=1e-5, rtol=1e-5)
        # the same change counts when the positions are declared real: the check above is not vacuous
        full = torch.ones_like(mask)
        real_a, real_b = model(ids, attention_mask=full).aux_loss, model(other, attention_mask=full).aux_loss
        assert (real_a - real_b).abs() > 100 * 64 * eps * real_a.abs()  # far outside the tolerance above
