"""Expert store placement, bounded device memory, NVMe pre-flight checks and the I/O backend."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
from offload_harness import OPTIM, batches, tiny_model, train

from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig, resolve, settings_from_flat
from moetrain.offload.nvme import ALIGN, NvmeError, SwapFile, aio_available, aligned_empty
from moetrain.offload.store import ExpertStore, Tier


def test_record_layout_is_one_flat_buffer():
    model = tiny_model(num_experts=4)
    store = ExpertStore(model, OffloadConfig(tier="cpu"))
    rec = store.records[(1, 2)]
    expert = model.moe_blocks()[1].experts[2]
    flat = store.host_view(rec)
    assert flat.numel() == rec.padded and rec.padded * 4 % ALIGN == 0 and rec.padded >= 3 * rec.numel
    master, exp_avg, exp_avg_sq = rec.parts(flat)
    for view, p in zip(rec.split(master), (expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight),
                       strict=True):
        assert torch.equal(view, p.detach())
    assert not exp_avg.any() and not exp_avg_sq.any()
    # views, not copies: one page-in of ``flat`` moves every part
    assert master.data_ptr() == flat.data_ptr() and exp_avg_sq.data_ptr() == flat.data_ptr() + 2 * rec.numel * 4


def test_cpu_budget_overflows_to_nvme(tmp_path):
    model = tiny_model(num_experts=4)
    rec_bytes = ExpertStore(model, OffloadConfig(tier="cpu")).records[(0, 0)].state_bytes
    cfg = OffloadConfig(tier="cpu", cpu_budget_gb=5 * rec_bytes / 2**30, nvme_path=str(tmp_path))
    store = ExpertStore(model, cfg)
    tiers = [r.tier for r in store]
    assert tiers.count(Tier.CPU) == 5 and tiers.count(Tier.NVME) == 3
    assert sum(piece.numel() for piece in store.slabs) * 4 == 5 * rec_bytes
    assert _swap_file(tmp_path).stat().st_size == 3 * rec_bytes
    store.close()


def _slot_bytes(num_experts: int, budget_gb: float) -> tuple[int, int]:
    model = tiny_model(num_experts=num_experts)
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="cpu", gpu_budget_gb=budget_gb))
    peak = opt.swapper.device_bytes
    train(model, opt, batches(steps=3), total=3, on_step=lambda _: None)
    peak = max(peak, opt.swapper.device_bytes, int(opt.telemetry()["offload/gpu_state_bytes"]))
    record = opt.store.max_padded * 4
    opt.close()
    return peak, record


def test_gpu_tier_bytes_bounded_and_independent_of_expert_count():
    record = ExpertStore(tiny_model(num_experts=8), OffloadConfig(tier="cpu")).max_padded * 4
    budget = 6 * record / 2**30  # six slots: fewer than the 16 (8 experts) or 128 (64 experts) records
    few, _ = _slot_bytes(8, budget)
    many, _ = _slot_bytes(64, budget)
    assert few == many == 6 * record
    assert many <= budget * 2**30


def test_gpu_budget_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="gpu_budget_gb"):
        build_optimizer(tiny_model(num_experts=4), OPTIM, OffloadConfig(tier="cpu", gpu_budget_gb=1e-9))


def test_nvme_path_missing(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(NvmeError, match="does not exist") as err:
        build_optimizer(tiny_model(num_experts=4), OPTIM, OffloadConfig(tier="nvme", nvme_path=str(missing)))
    assert str(missing) in str(err.value)


def test_nvme_path_unwritable(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    if os.geteuid() == 0:  # root ignores permission bits: make the access check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(folder) else real(p, mode))
    with pytest.raises(NvmeError, match="not writable") as err:
        build_optimizer(tiny_model(num_experts=4), OPTIM, OffloadConfig(tier="nvme", nvme_path=str(folder)))
    assert str(folder) in str(err.value)
    folder.chmod(0o700)


def test_nvme_too_little_space(tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    with pytest.raises(NvmeError, match=r"0\.00 GiB free but the offload plan needs") as err:
        build_optimizer(tiny_model(num_experts=4), OPTIM, OffloadConfig(tier="nvme", nvme_path=str(tmp_path)))
    assert str(tmp_path) in str(err.value)
    assert not list(tmp_path.iterdir()), "nothing may be written when the plan does not fit"


def test_overflow_without_nvme_path_is_a_clear_error():
    with pytest.raises(NvmeError, match=r"model\.offload\.nvme\.path"):
        build_optimizer(tiny_model(num_experts=4), OPTIM, OffloadConfig(tier="cpu", cpu_budget_gb=1e-6))


@pytest.mark.parametrize("backend", ["auto", "threads"])
def test_swap_file_round_trip_and_backend(tmp_path, caplog, backend):
    size = 4 * ALIGN
    with caplog.at_level(logging.WARNING, logger="moetrain.offload.nvme"):
        swap = SwapFile(str(tmp_path), size, backend=backend)
    expected = "aio" if backend == "auto" and aio_available() else "threads"
    print(f"NVMe backend with nvme_backend={backend}: {swap.backend}")
    assert swap.backend == expected
    if backend == "auto" and expected == "threads":
        assert "libaio is missing" in caplog.text
    assert _swap_file(tmp_path).stat().st_size == size  # preallocated
    data = torch.randn(ALIGN // 4 * 2)
    out = aligned_empty(data.numel(), pin=False)
    out.copy_(data)
    swap.submit_write(out, ALIGN)
    swap.wait_writes()
    back = aligned_empty(data.numel(), pin=False)
    swap.submit_read(back, ALIGN)
    swap.wait_reads()
    assert torch.equal(back, data)
    swap.close()
    assert not list(tmp_path.glob("moetrain-experts-*.swp"))


def test_aio_backend_is_used_when_libaio_exists(tmp_path):
    model = tiny_model(num_experts=4)
    opt = build_optimizer(model, OPTIM, OffloadConfig(tier="nvme", nvme_path=str(tmp_path)))
    print(f"NVMe backend in use: {opt.store.nvme_backend} (libaio available: {aio_available()})")
    assert opt.store.nvme_backend == ("aio" if aio_available() else "threads")
    opt.close()


def test_config_rejects_what_is_not_supported():
    # resolve() holds the section's rules; the flat OffloadConfig an engine test builds is taken as it is
    with pytest.raises(ValueError, match="resident_weights=no"):
        resolve(settings_from_flat(tier="none", resident_weights="no"))
    with pytest.raises(ValueError, match="step_on"):
        resolve(settings_from_flat(tier="cpu", step_on="tpu"))
    with pytest.raises(ValueError, match=r"nvme\.path"):
        resolve(settings_from_flat(tier="nvme"))


def _swap_file(folder):
    """The one swap file a store created in ``folder`` (named per process and store)."""
    (path,) = folder.glob("moetrain-experts-*.swp")
    return path
