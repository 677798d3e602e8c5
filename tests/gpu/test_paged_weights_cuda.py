"""``resident_weights: no`` on CUDA: compute weights paged from pinned host memory on a copy stream into
two layer-sized device buffers, fetched again for backward, written back after each step. With three MoE
layers the buffers are reused within every forward and backward, so a missing wait shows up as a
difference from the resident run, which computes with the very same bf16 weights and kernels.

Run on the GPU machine: ``python -m pytest -q tests/gpu/test_paged_weights_cuda.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "offload"))
from offload_harness import OPTIM, batches, clone, tiny_model  # noqa: E402

from moetrain.offload import build_optimizer  # noqa: E402
from moetrain.offload.config import OffloadConfig  # noqa: E402
from moetrain.optim import lr_at  # noqa: E402

STEPS = 12


def _run(base, data, accum: int = 2, **offload):
    """(fp32 masters by name, expert compute weights by name, telemetry of the last step, device bytes of
    the optimizer's expert weights) after STEPS steps of bf16 autocast training."""
    model = clone(base)
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", gpu_slots=4, **offload))
    for i in range(len(data) // accum):
        for ids in data[i * accum:(i + 1) * accum]:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(ids.cuda(), labels=ids.cuda())
            (out.loss / accum).backward()
        opt.clip_grad_norm_(OPTIM.max_grad_norm)
        opt.step(lr_at(OPTIM, i, STEPS))
        opt.zero_grad()
    opt.finalize()
    torch.cuda.synchronize()
    telemetry = opt.telemetry()
    masters = {n: t.float().cpu() for n, t in opt.named_master_tensors()}
    weights = {}
    for rec in opt.store:
        row = opt.pager.weights(rec.layer, rec.expert) if opt.pager is not None else \
            torch.cat([p.detach().reshape(-1) for p in rec.params]).cpu()
        weights.update({n: w.float().clone() for n, w in zip(rec.names, rec.split(row), strict=True)})
    opt.close()
    return masters, weights, telemetry


@pytest.mark.parametrize("impl,step_on", [("auto", "gpu"), ("auto", "auto"), ("loop", "gpu")])
def test_paged_weights_equal_resident_weights(impl, step_on):
    base = tiny_model(num_experts=16, layers=3).cuda()
    base.set_expert_impl(impl)
    data = batches(steps=STEPS)
    resident_masters, resident_weights, _ = _run(base, data, step_on=step_on)
    masters, weights, telemetry = _run(base, data, step_on=step_on, resident_weights="no")
    worst = max((masters[n] - resident_masters[n]).abs().max().item() for n in masters)
    assert worst <= 1e-6, f"paged vs resident masters differ by {worst:.2e}"
    assert max((weights[n] - resident_weights[n]).abs().max().item() for n in weights) <= 1e-6
    assert telemetry["offload/weights_h2d_bytes"] > 0


def test_paged_weights_leave_the_device():
    base = tiny_model(num_experts=64, layers=4).cuda()
    resident = clone(base)
    build_optimizer(resident, OPTIM, OffloadConfig(tier="cpu", gpu_slots=4))
    torch.cuda.synchronize()
    expert_bytes = sum(p.numel() * p.element_size() for n, p in resident.named_parameters()
                       if n in resident.expert_parameter_names())
    model = clone(base)
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", gpu_slots=4, resident_weights="no"))
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for n, p in model.named_parameters()
                if n in model.expert_parameter_names()}  # every expert parameter shares one placeholder element
    assert sum(storages.values()) <= 8
    assert opt.pager.device_bytes == expert_bytes // 2  # two of four layers' worth of buffers
    assert all(h.is_pinned() for h in opt.pager.host.values())
    opt.close()


def test_activation_checkpointing_with_paged_weights():
    """Layers recomputed in backward (from the backward thread, on CUDA): the same masters as without."""
    base = tiny_model(num_experts=16, layers=3).cuda()
    data = batches(steps=STEPS)
    plain, _, _ = _run(base, data, resident_weights="no")
    checkpointed = clone(base)
    checkpointed.set_activation_checkpointing(True)
    masters, _, telemetry = _run(checkpointed, data, resident_weights="no")
    assert max((masters[n] - plain[n]).abs().max().item() for n in masters) <= 1e-6
    assert telemetry["offload/weights_h2d_bytes"] > 0


def test_init_from_loads_paged_weights_into_host_memory(tiny_hf, save_hf, randomize):
    """init_from with resident_weights=no on CUDA: the experts' weights land in pinned host memory and are
    never allocated on the GPU (the load's GPU peak is the dense part and the pager's two buffers)."""
    from moetrain.offload.staged_init import load_into_tiers

    hf_dir = save_hf(randomize(tiny_hf("qwen3_moe"), std=0.2), "qwen3", max_shard_size="40KB")
    device = torch.device("cuda")
    resident, store = load_into_tiers(hf_dir, OffloadConfig(tier="cpu", gpu_slots=3), device)
    expert_bytes = sum(p.numel() * p.element_size() for n, p in resident.named_parameters()
                       if n in resident.expert_parameter_names())
    del resident
    store.close()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    paged, paged_store = load_into_tiers(hf_dir, OffloadConfig(tier="cpu", gpu_slots=3, resident_weights="no"), device)
    held = torch.cuda.memory_allocated() - before
    dense_bytes = sum(p.numel() * p.element_size() for n, p in paged.named_parameters()
                      if n not in paged.expert_parameter_names())
    # dense weights, the pager's two buffers and the placeholder (plus the allocator's 512-byte rounding of
    # each tensor): far below a load that put the experts' weights on the GPU, even for a moment
    slack = 512 * sum(1 for n, _ in paged.named_parameters() if n not in paged.expert_parameter_names()) + 4096
    assert expert_bytes > 2 * slack  # so that experts put on the GPU would break the bounds below
    assert torch.cuda.max_memory_allocated() - before <= dense_bytes + paged_store.pager.device_bytes + slack
    assert held <= dense_bytes + paged_store.pager.device_bytes + slack
    assert all(h.is_pinned() for h in paged_store.pager.host.values())
    paged_store.close()
