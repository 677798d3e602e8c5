"""The planner's byte counts against the real model, its fit verdicts, and its step floor."""

from __future__ import annotations

from offload_harness import tiny_model

from moetrain.offload.config import OffloadConfig
from moetrain.offload.nvme import align_up
from moetrain.offload.plan import count_parameters, make_plan
from moetrain.offload.store import ExpertStore

GiB = 2**30


def test_counts_match_the_model():
    model = tiny_model(num_experts=16)
    dense, expert, per_expert = count_parameters(model.config)
    names = model.expert_parameter_names()
    params = dict(model.named_parameters())
    assert expert == sum(params[n].numel() for n in names)
    assert dense == sum(p.numel() for n, p in params.items() if n not in names)
    assert per_expert == sum(p.numel() for p in model.moe_blocks()[0].experts[0].parameters())


def test_bytes_per_tier_and_overflow(tmp_path):
    model = tiny_model(num_experts=16)
    dense, expert, per_expert = count_parameters(model.config)
    record = align_up(12 * per_expert)  # the store's aligned record
    cfg = OffloadConfig(tier="cpu", gpu_budget_gb=4 * record / GiB, cpu_budget_gb=10 * record / GiB,
                        nvme_path=str(tmp_path))
    plan = make_plan(model.config, cfg, tokens_per_step=64, gpu_capacity=GiB, host_capacity=GiB, disk_free=GiB)
    assert plan.gpu_bytes == 16 * dense + 4 * expert + 4 * expert + 4 * record  # fp32 weights and grads
    assert plan.nvme_bytes == 32 * record - 10 * record
    assert plan.host_bytes == 10 * record + 4 * record  # state in memory + NVMe staging
    assert plan.fits() == {"gpu": True, "host": True, "nvme": True}
    # the store places records the same way
    store = ExpertStore(model, cfg)
    assert store.cpu_bytes == 10 * record and store.nvme_bytes == plan.nvme_bytes
    store.close()


def test_fit_verdicts_and_floor():
    model = tiny_model(num_experts=16)
    cfg = OffloadConfig(tier="nvme", nvme_path="/nonexistent-folder")
    plan = make_plan(model.config, cfg, tokens_per_step=1_000_000, gpu_capacity=1, host_capacity=1 << 40,
                     disk_free=10, link_gbps=1e-3, compute_tflops=1e9)
    assert plan.fits() == {"gpu": False, "host": True, "nvme": False}
    assert plan.active_experts > 31.99  # a million tokens touch every expert
    dense, expert, _ = count_parameters(model.config)
    assert abs(plan.moved_bytes - 24 * expert) < 1e-3 * 24 * expert
    assert plan.floor_s == plan.transfer_s == plan.moved_bytes / 1e6
    text = plan.format()
    assert "DOES NOT FIT" in text and "link-bound" in text
    none = make_plan(model.config, OffloadConfig(tier="none"), tokens_per_step=64, gpu_capacity=1 << 40)
    assert none.moved_bytes == 0 and none.gpu_bytes == 16 * (dense + expert) and "compute-bound" in none.format()


def test_expected_active_experts_follow_the_token_count():
    model = tiny_model(num_experts=16)
    few = make_plan(model.config, OffloadConfig(tier="cpu"), tokens_per_step=1)
    assert abs(few.active_experts - 2 * 16 * (1 - (15 / 16) ** 2)) < 1e-9  # 2 layers, 1 token, top-2


def test_plan_command_prints_the_recipe_plan(tmp_path, capsys):
    from moetrain.offload.plan import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: tiny-deepseek-moe\n  offload:\n    tier: cpu\n"
                      "data:\n  seq_len: 64\n  micro_batch_size: 2\n")
    assert main(["--config", str(recipe), "--model.offload.cpu_budget_gb=0", f"--model.offload.nvme_path={tmp_path}",
                 "--link_gbps=10"]) == 0
    text = capsys.readouterr().out
    assert "nvme  expert master + exp_avg + exp_avg_sq (swap)" in text and "at 10 GB/s" in text
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
