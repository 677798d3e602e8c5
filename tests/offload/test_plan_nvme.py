"""The step-time floor has an NVMe term: a paged expert whose state record lives in the swap is read from it
before its step and written back after, at an assumed NVMe rate (``--nvme_gbps``), and the floor is the slowest of
compute, the host-GPU link and the swap. The bytes are checked against what the store's swap file moves."""

from __future__ import annotations

from pathlib import Path

import pytest
from offload_harness import OPTIM, batches, tiny_model, train

from moetrain.cli import main
from moetrain.config import ModelConfig
from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig
from moetrain.offload.nvme import align_up
from moetrain.offload.plan import DEFAULT_NVME_GBPS, GiB, count_parameters, make_plan

CAPS = dict(gpu_capacity=GiB, host_capacity=GiB, disk_free=GiB)


def _record(config: ModelConfig) -> int:
    return align_up(12 * count_parameters(config)[2])  # the store's aligned fp32 record


def test_the_swap_moves_what_the_plan_says(tmp_path):
    """12 of the tiny model's 32 records in host memory, 20 in the swap, every expert active in most steps: the
    swap reads and writes the paged records it holds, which the plan expects to be 20 each way a step."""
    model = tiny_model(num_experts=16)
    record = _record(model.config)
    off = OffloadConfig(tier="cpu", cpu_budget_gb=12 * record / GiB, gpu_slots=4, hot_cache_gb=0,
                        nvme_path=str(tmp_path))
    opt = build_optimizer(model, OPTIM, off)
    assert (opt.store.cpu_bytes, opt.store.nvme_bytes) == (12 * record, 20 * record)
    seen: list[dict[str, float]] = []
    steps = 3
    train(model, opt, batches(steps=steps, tokens=256), total=steps, on_step=lambda _: seen.append(opt.telemetry()))
    opt.close()
    plan = make_plan(model.config, off, 512, **CAPS)
    assert plan.paged_experts == pytest.approx(32, abs=1e-3)
    assert plan.nvme_moved_bytes == pytest.approx(2 * 20 * record, rel=1e-3)
    read = sum(t["offload/nvme_read_bytes"] for t in seen) / steps
    written = sum(t["offload/nvme_write_bytes"] for t in seen) / steps
    assert read == pytest.approx(plan.nvme_moved_bytes / 2, rel=0.1)  # an expert or two idle in a real step
    assert written == pytest.approx(plan.nvme_moved_bytes / 2, rel=0.1)


def test_the_floor_is_the_slowest_of_compute_link_and_nvme():
    config = ModelConfig.from_preset("qwen3-30b-a3b")
    record = _record(config)
    in_host = make_plan(config, OffloadConfig(tier="cpu", hot_cache_gb=0), 4096, **CAPS)
    assert in_host.nvme_moved_bytes == 0 and in_host.nvme_s == 0
    assert in_host.floor_s == max(in_host.compute_s, in_host.transfer_s)
    assert "nvme:" not in in_host.format()
    half = OffloadConfig(tier="cpu", hot_cache_gb=0, cpu_budget_gb=3072 * record / GiB, nvme_path="unused")
    swapped = make_plan(config, half, 4096, **CAPS)
    # every expert is active at 4 k tokens x top-8: half of the paged records are in the swap, read and written
    assert swapped.nvme_moved_bytes == pytest.approx(2 * 3072 * record * swapped.paged_experts / 6144, rel=1e-6)
    assert swapped.nvme_s == swapped.nvme_moved_bytes / (DEFAULT_NVME_GBPS * 1e9)
    assert swapped.floor_s == swapped.nvme_s > max(swapped.compute_s, swapped.transfer_s)
    assert swapped.bound == "nvme" and "(nvme-bound)" in swapped.format()
    fast = make_plan(config, half, 4096, **CAPS, nvme_gbps=1000.0)
    assert fast.nvme_moved_bytes == swapped.nvme_moved_bytes and fast.bound != "nvme"
    # every record in the swap (tier nvme): every paged record is read and written
    nvme = make_plan(config, OffloadConfig(tier="nvme", hot_cache_gb=0, nvme_path="unused"), 4096, **CAPS)
    assert nvme.nvme_moved_bytes == pytest.approx(2 * record * nvme.paged_experts, rel=1e-6)


def test_plan_prints_the_nvme_line_at_the_rate_asked(capsys, monkeypatch):
    """The Qwen3-30B-A3B recipe with a 30 GiB host budget overflows 25 GiB of state to the swap; ``--nvme_gbps`` sets
    the rate of its line."""
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    args = ["plan", "--config", "recipes/qwen3-30b-a3b.yaml", "--gpu-gb=139", "--host-gb=125", "--disk-gb=512",
            "--model.offload.placement.cpu_budget_gb=30", "--model.offload.nvme.path=swap/qwen3-30b-a3b"]
    assert main(args) == 0
    default = [x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("nvme:")]
    assert main([*args, "--nvme_gbps=12"]) == 0
    faster = [x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("nvme:")]
    assert len(default) == len(faster) == 1
    assert f"at {DEFAULT_NVME_GBPS:g} GB/s (assumed" in default[0] and "at 12 GB/s" in faster[0]
