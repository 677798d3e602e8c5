"""The grouped expert path on CUDA held to the references the CPU tests use (``tests/models/test_moe.py``): a
per-token loop in fp64 for dispatch and combine, and one expert with top-1 equal to a dense SwiGLU, in outputs,
input gradients and weight gradients.

The grouped kernel runs in bf16 with fp32 accumulation. Inputs and weights are rounded to bf16 first, so the
fp64 reference sees exactly the kernel's operands and the only difference is the kernel's rounding of its bf16
intermediates (gate, up, their product, the output: about 2**-9 relative each). The tolerance, 1e-2 of the
largest entry, is half the 2e-2 that ``test_experts_cuda.py`` allows between two bf16 paths.
"""

import pytest
import torch

from moetrain.models.experts import RoutedExperts, SwiGLU
from moetrain.models.router import Routing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                reason="needs CUDA sm90+ (the grouped kernel)")

H, WIDTH, TOL = 64, 32, 1e-2


def _routing(num_tokens: int, num_experts: int, k: int) -> Routing:
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(num_tokens)])  # (T, k)
    weight = torch.rand(num_tokens, k, generator=g)
    counts = torch.bincount(idx.reshape(-1), minlength=num_experts)
    return Routing(topk_idx=idx.cuda(), topk_weight=weight.cuda(), counts=counts.cuda(),
                   logits=torch.zeros(num_tokens, num_experts, device="cuda"), aux_loss=torch.zeros((), device="cuda"))


def _bf16_experts(num_experts: int) -> RoutedExperts:
    torch.manual_seed(0)
    experts = RoutedExperts(num_experts, H, WIDTH, impl="grouped").cuda()
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.2)
    return experts.to(torch.bfloat16)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = want.abs().max().item()
    assert scale > 0
    err = (got.double().cpu() - want).abs().max().item()
    assert err <= TOL * scale, f"max error {err:.3g} > {TOL} x {scale:.3g}"


def test_grouped_dispatch_equals_a_per_token_loop_on_cuda():
    num_tokens, num_experts, k = 48, 8, 3
    experts = _bf16_experts(num_experts)
    routing = _routing(num_tokens, num_experts, k)
    x = torch.randn(num_tokens, H, device="cuda").to(torch.bfloat16).requires_grad_(True)
    out = experts(x, routing)
    grad = torch.randn(num_tokens, H, device="cuda").to(torch.bfloat16)
    out.backward(grad)
    # naive fp64 reference on the host: every token visits its chosen experts one by one
    reference = [SwiGLU(H, WIDTH).double() for _ in range(num_experts)]
    for ref_expert, expert in zip(reference, experts, strict=True):
        ref_expert.load_state_dict({n: t.double().cpu() for n, t in expert.state_dict().items()})
    x_ref = x.detach().double().cpu().requires_grad_(True)
    idx, w = routing.topk_idx.cpu(), routing.topk_weight.double().cpu()
    rows = []
    for t in range(num_tokens):
        acc = torch.zeros(H, dtype=torch.float64)
        for j in range(k):
            acc = acc + w[t, j] * reference[int(idx[t, j])](x_ref[t])
        rows.append(acc)
    ref = torch.stack(rows)
    ref.backward(grad.double().cpu())
    _close(out, ref.detach())
    _close(x.grad, x_ref.grad)
    for ref_expert, expert in zip(reference, experts, strict=True):
        for name, p in expert.named_parameters():
            _close(p.grad, ref_expert.get_parameter(name).grad)


def test_grouped_one_expert_equals_dense_swiglu_on_cuda():
    experts = _bf16_experts(1)
    routing = _routing(20, 1, 1)
    routing.topk_weight.fill_(1.0)
    x = torch.randn(20, H, device="cuda").to(torch.bfloat16).requires_grad_(True)
    out = experts(x, routing)
    grad = torch.randn(20, H, device="cuda").to(torch.bfloat16)
    out.backward(grad)
    dense = SwiGLU(H, WIDTH).double()
    dense.load_state_dict({n: t.double().cpu() for n, t in experts[0].state_dict().items()})
    x_ref = x.detach().double().cpu().requires_grad_(True)
    ref = dense(x_ref)
    ref.backward(grad.double().cpu())
    _close(out, ref.detach())
    _close(x.grad, x_ref.grad)
    for name, p in experts[0].named_parameters():
        _close(p.grad, dense.get_parameter(name).grad)
