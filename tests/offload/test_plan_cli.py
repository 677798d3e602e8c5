"""`moetrain plan --preset=deepseek-v3`: the one-GPU plan, then memory per tier for 1, 8 and 64 GPUs."""

import re

from moetrain.config import ModelConfig
from moetrain.offload.plan import main
from moetrain.offload.plan_parallel import ADAM_BYTES, expert_parallel_plan

GiB = 2**30


def test_plan_reports_deepseek_v3_per_gpu_for_1_8_64(capsys):
    assert main(["--preset=deepseek-v3"]) == 0
    out = capsys.readouterr().out
    config = ModelConfig.from_preset("deepseek-v3")
    counts = config.param_counts()
    for world in (1, 8, 64):
        plan = expert_parallel_plan(config, world)
        row = re.search(rf"^\s+{world}\s+(\d+)\s+([\d.]+) GiB\s+([\d.]+) GiB\s+([\d.]+) GiB", out, re.M)
        assert row, f"no row for {world} GPUs in:\n{out}"
        experts, no_offload, gpu, host = int(row[1]), float(row[2]), float(row[3]), float(row[4])
        assert experts == -(-config.num_experts // world)
        # the table is the arithmetic of the rule, not stored numbers: 16 B/param without offload
        expected = (counts["dense"] + plan.expert_params_per_rank) * ADAM_BYTES / GiB
        assert abs(no_offload - expected) < 0.06
        assert abs(gpu - plan.gpu_offload / GiB) < 0.06 and abs(host - plan.host_offload / GiB) < 0.06
    # more GPUs, less memory per GPU
    rows = [expert_parallel_plan(config, w) for w in (1, 8, 64)]
    assert rows[0].gpu_no_offload > rows[1].gpu_no_offload > rows[2].gpu_no_offload


def test_plan_needs_a_recipe_or_a_preset(capsys):
    assert main([]) == 2
    assert "--config RECIPE" in capsys.readouterr().err
