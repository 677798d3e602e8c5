"""bf16 compute weights over the store's fp32 master: packed storage, and one step equal to torch AdamW
on the fp32 master with the (upcast) bf16 gradients."""

from __future__ import annotations

import torch
from offload_harness import OPTIM, tiny_model

from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig


def _packed_ptrs(model) -> list[int]:
    return [w.data_ptr() for b in model.moe_blocks() for w in b.experts.packed_weights()]


def test_bf16_compute_weights_step_like_adamw_on_the_master():
    model = tiny_model()
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters() if n in model.expert_parameter_names()}
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", compute_dtype="bf16", gpu_slots=3))
    params = dict(model.named_parameters())
    assert all(params[n].dtype == torch.bfloat16 for n in fp32)
    masters = dict(opt.named_master_tensors())
    assert all(torch.equal(masters[n], fp32[n]) for n in fp32)  # the master kept the fp32 weights
    for block in model.moe_blocks():  # the parameters are slices of one packed bf16 tensor per projection
        for name, packed in zip(("gate_proj", "up_proj", "down_proj"), block.experts.packed_weights(), strict=True):
            assert packed.dtype == torch.bfloat16
            assert all(getattr(e, name).weight.data_ptr() == packed[i].data_ptr() for i, e in enumerate(block.experts))
    ptrs = _packed_ptrs(model)

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: params[n].grad.clone() for n in fp32 if params[n].grad is not None}
    assert grads and all(g.dtype == torch.bfloat16 for g in grads.values())
    assert len(grads) < len(fp32)  # some experts idle: torch AdamW skips them (grad None)
    opt.clip_grad_norm_(0.0)
    opt.step(OPTIM.lr)

    ref = {n: torch.nn.Parameter(masters[n].clone()) for n in fp32}
    for n, p in ref.items():
        p.grad = grads[n].float() if n in grads else None
    ref_opt = torch.optim.AdamW(list(ref.values()), lr=OPTIM.lr, betas=OPTIM.betas, eps=OPTIM.eps,
                                weight_decay=OPTIM.weight_decay, foreach=False)
    ref_opt.step()
    new_masters = dict(opt.named_master_tensors())
    moved = [n for n in fp32 if not torch.equal(new_masters[n], masters[n])]
    assert sorted(moved) == sorted(grads)
    for n in fp32:
        assert torch.equal(new_masters[n], ref[n].detach()), n
        assert torch.equal(params[n].detach(), ref[n].detach().to(torch.bfloat16)), n  # weights written in place
    assert _packed_ptrs(model) == ptrs  # in place: no repack, no new storage
    opt.close()


def test_auto_compute_dtype_is_fp32_on_cpu():
    model = tiny_model()
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    opt.close()
