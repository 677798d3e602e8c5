"""The stacked expert gradients on CUDA (moetrain.models.expert_grads): the grouped kernel writes zeros for an empty
group here (so no masking pass runs), and two micro-batches with an idle expert accumulate what autograd's own
accumulation of the same grouped GEMMs on stacked leaf weights gives, to bf16 rounding (autograd's own backward of
``torch._grouped_mm`` lays its GEMMs out its own way)."""

import pytest
import torch
from grouped_reference import grouped_reference

from moetrain.models.expert_grads import empty_groups_read_zero
from moetrain.models.experts import RoutedExperts
from moetrain.models.router import Routing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                reason="needs CUDA sm90+ (the grouped kernel)")

E, H, WIDTH, K, T = 8, 128, 64, 2, 64


def _routing(seed: int, avoid: tuple[int, ...]) -> Routing:
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in avoid])
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(T)])
    return Routing(topk_idx=idx.cuda(), topk_weight=torch.rand(T, K, generator=g).cuda(),
                   counts=torch.bincount(idx.reshape(-1), minlength=E).cuda(),
                   logits=torch.zeros(T, E, device="cuda"), aux_loss=torch.zeros((), device="cuda"))


def test_the_grouped_kernel_writes_zeros_for_empty_groups_on_this_card():
    assert empty_groups_read_zero(torch.device("cuda")), (
        "torch._grouped_mm left an empty group unwritten: the experts fall back to a masking pass (correct, slower)")


def test_stacked_grads_equal_autograd_on_stacked_leaves():
    torch.manual_seed(0)
    experts = RoutedExperts(E, H, WIDTH, impl="grouped").cuda().to(torch.bfloat16)
    stacks = [torch.stack([getattr(e, n).weight.detach() for e in experts]).requires_grad_(True)
              for n in ("gate_proj", "up_proj", "down_proj")]
    for seed, avoid in ((0, (3,)), (1, (3, 5))):  # expert 3 idle in both micro-batches, 5 in the second
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        routing = _routing(seed, avoid)
        experts(x, routing).float().pow(2).sum().backward()
        grouped_reference(x, routing, stacks).float().pow(2).sum().backward()
    for m, name in enumerate(("gate_proj", "up_proj", "down_proj")):
        got = torch.stack([getattr(e, name).weight.grad for e in experts])
        assert torch.equal(got[3], torch.zeros_like(got[3])), f"{name}: the idle expert's gradient is not zero"
        torch.testing.assert_close(got, stacks[m].grad, rtol=2e-2, atol=2e-2 * stacks[m].grad.abs().max().item())
