"""The grouped expert path on CUDA: equal to the per-expert loop, and free of host syncs."""

import pytest
import torch

from moetrain.config import ModelConfig
from moetrain.models.moe import MoEBlock

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _block(num_experts=16, hidden=256, width=128, top_k=4):
    cfg = ModelConfig(family="deepseek_moe", hidden_size=hidden, num_attention_heads=4, num_experts=num_experts,
                      num_experts_per_tok=top_k, moe_intermediate_size=width, num_shared_experts=1,
                      aux_loss="seq", aux_loss_coef=0.01)
    torch.manual_seed(0)
    return MoEBlock(cfg, layer_idx=0).cuda()


def _run(block, x, impl):
    block.experts.impl = impl
    block.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, routing = block(xi)
    (out.float().square().mean() + routing.aux_loss).backward()
    grads = {n: (p.grad.float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float))
             for n, p in block.named_parameters()}
    return out.float(), xi.grad.float(), grads


def test_grouped_equals_loop_in_bf16():
    block = _block()
    x = torch.randn(2, 64, 256, device="cuda")
    y_loop, gx_loop, g_loop = _run(block, x, "loop")
    y_grp, gx_grp, g_grp = _run(block, x, "grouped")
    # Both paths compute each expert in bf16 with fp32 accumulation; they differ only by rounding.
    scale = y_loop.abs().max()
    assert (y_loop - y_grp).abs().max() <= 2e-2 * scale
    assert (gx_loop - gx_grp).abs().max() <= 2e-2 * gx_loop.abs().max()
    for name, ref in g_loop.items():
        assert (g_grp[name] - ref).abs().max() <= 2e-2 * ref.abs().max().clamp_min(1e-6), name


def test_idle_expert_gets_zero_grad_on_grouped_path():
    block = _block(num_experts=16, top_k=1)
    x = torch.randn(1, 4, 256, device="cuda")  # 4 tokens, top-1: at least 12 experts idle
    _, _, grads = _run(block, x, "grouped")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        routing = block.gate(x.reshape(4, 256), batch_size=1)
    counts = routing.counts.cpu()
    for e in range(16):
        g = grads[f"experts.{e}.gate_proj.weight"]
        assert (g.abs().sum() == 0) == (counts[e] == 0), e


def test_grouped_forward_backward_has_no_host_sync():
    block = _block()
    block.experts.impl = "grouped"
    x = torch.randn(2, 64, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        block(x)  # packs the expert weights once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, routing = block(x)
        (out.float().square().mean() + routing.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
