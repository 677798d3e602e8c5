"""The grouped experts' weight gradients land in one stacked tensor per layer and matrix (moetrain.models.expert_grads):
values equal autograd's own accumulation of the same grouped GEMMs, across micro-batches, after a zero_grad, with
frozen experts and with gradients something else left behind."""

from __future__ import annotations

import pytest
import torch
from grouped_reference import grouped_reference

from moetrain.models.expert_grads import accumulate_expert_grads, empty_groups_read_zero
from moetrain.models.experts import RoutedExperts
from moetrain.models.router import Routing

E, H, WIDTH, K, T = 5, 16, 8, 2, 12


def _routing(seed: int, avoid: tuple[int, ...] = ()) -> Routing:
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in avoid])
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(T)])  # (T, K)
    weight = torch.rand(T, K, generator=g)
    return Routing(topk_idx=idx, topk_weight=weight, counts=torch.bincount(idx.reshape(-1), minlength=E),
                   logits=torch.zeros(T, E), aux_loss=torch.zeros(()))


def _reference_grads(experts: RoutedExperts, batches: list[tuple[torch.Tensor, Routing]]) -> list[torch.Tensor]:
    """Autograd's accumulation over ``batches`` of the same grouped GEMMs, on three stacked leaf weights."""
    stacks = [torch.stack([getattr(e, name).weight.detach() for e in experts]).requires_grad_(True)
              for name in ("gate_proj", "up_proj", "down_proj")]
    for x, routing in batches:
        grouped_reference(x, routing, stacks).pow(2).sum().backward()
    return [s.grad for s in stacks]


def _loss(experts: RoutedExperts, x: torch.Tensor, routing: Routing) -> None:
    experts(x, routing).pow(2).sum().backward()


@pytest.mark.parametrize("frozen", [(), (1, 3)])
def test_stacked_grads_equal_autograd_accumulation_over_micro_batches(frozen):
    torch.manual_seed(0)
    experts = RoutedExperts(E, H, WIDTH, impl="grouped")
    for e in frozen:
        experts[e].requires_grad_(False)
    batches = [(torch.randn(T, H), _routing(s, avoid=(2,) if s == 1 else ())) for s in range(3)]
    for x, routing in batches:
        _loss(experts, x, routing)
    reference = _reference_grads(experts, batches)
    for m, name in enumerate(("gate_proj", "up_proj", "down_proj")):
        grads = [getattr(experts[e], name).weight.grad for e in range(E)]
        bases = {id(g._base) for e, g in enumerate(grads) if e not in frozen}
        assert len(bases) == 1, f"{name}: the trained experts' grads are not views of one stack"
        for e in range(E):
            if e in frozen:
                assert grads[e] is None
            else:
                torch.testing.assert_close(grads[e], reference[m][e], rtol=1e-5, atol=1e-5)


def test_zero_grad_frees_the_stack_and_the_next_backward_starts_fresh():
    torch.manual_seed(1)
    experts = RoutedExperts(E, H, WIDTH, impl="grouped")
    first = (torch.randn(T, H), _routing(0))
    _loss(experts, *first)
    old = experts[0].gate_proj.weight.grad._base
    experts.zero_grad(set_to_none=True)
    second = (torch.randn(T, H), _routing(5))
    _loss(experts, *second)
    assert experts[0].gate_proj.weight.grad._base is not old
    torch.testing.assert_close(experts[3].down_proj.weight.grad, _reference_grads(experts, [second])[2][3],
                               rtol=1e-5, atol=1e-5)


def test_a_gradient_left_outside_the_stack_is_folded_in():
    """An expert whose .grad something else set (not a view of the stack) keeps it: the next micro-batch adds."""
    torch.manual_seed(2)
    experts = RoutedExperts(E, H, WIDTH, impl="grouped")
    params = list(experts.parameters())
    batch = (torch.randn(T, H), _routing(3))
    _loss(experts, *batch)
    reference = _reference_grads(experts, [batch])
    extra = torch.randn(WIDTH, H)
    experts[E - 1].gate_proj.weight.grad = extra.clone()  # replaces the view: the stacks no longer line up
    d = [torch.ones(E, WIDTH, H), torch.ones(E, WIDTH, H), torch.ones(E, H, WIDTH)]
    accumulate_expert_grads(params, d, trained=list(range(E)))
    torch.testing.assert_close(experts[E - 1].gate_proj.weight.grad, extra + 1)
    torch.testing.assert_close(experts[0].up_proj.weight.grad, reference[1][0] + 1)
    assert experts[E - 1].gate_proj.weight.grad._base is experts[0].gate_proj.weight.grad._base


def test_cpu_grouped_kernel_writes_zero_for_empty_groups():
    assert empty_groups_read_zero(torch.device("cpu"))


def test_global_norm_reads_a_whole_stack_once_and_a_partial_one_slice_by_slice():
    from moetrain.optim import global_grad_norm

    torch.manual_seed(3)
    experts = RoutedExperts(E, H, WIDTH, impl="grouped")
    _loss(experts, torch.randn(T, H), _routing(4))
    params = list(experts.parameters())
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    torch.testing.assert_close(global_grad_norm(params), expected, rtol=1e-6, atol=0)
    experts[1].up_proj.weight.grad = None  # freed (as the engine does after a step): its stale slice must not count
    rest = [p for p in params if p.grad is not None]
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in rest]))
    torch.testing.assert_close(global_grad_norm(params), expected, rtol=1e-6, atol=0)


def test_global_norm_reduces_whole_stacks_in_the_gradients_order():
    """A whole stack takes the place of its first slice, and a zero_if_none parameter without a gradient counts as
    a zero one in its own place; the stacks once came last in the order of a set of ids (memory addresses), so the
    norm's rounding changed from one run to the next."""
    from moetrain.optim import _whole_stacks, global_grad_norm

    a, b, dense = torch.randn(2, 3), torch.randn(2, 3), torch.randn(3)
    out = _whole_stacks([b[0], dense, a[0], b[1], a[1]])
    assert len(out) == 3 and out[0] is b and out[1] is dense and out[2] is a
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    params[0].grad, params[2].grad = torch.randn(3), torch.randn(3)
    sparse = global_grad_norm(params, zero_if_none={id(params[1])})
    params[1].grad = torch.zeros(3)
    assert torch.equal(sparse, global_grad_norm(params))
