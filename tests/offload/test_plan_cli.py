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


def test_plan_largest_for_another_machine(capsys):
    """`moetrain plan --largest` with the machine given by flags: the answer and its plan (the derivations of the
    answers are in tests/offload/test_plan.py::test_largest_preset_on_an_h100_machine, where the 64 GiB disk
    decides, and ::test_deepseek_moe_16b_on_an_h100_machine)."""
    assert main(["--largest", "--gpu-gb=80", "--host-gb", "125", "--disk-gb=64"]) == 0
    out = capsys.readouterr().out
    assert "GPU 80 GiB, host 125 GiB, disk 64 GiB" in out
    assert re.search(r"^Largest: olmoe-1b-7b, expert state in host memory, master fp32_split, moments int8", out, re.M)
    assert re.search(r"^\s+deepseek-moe-16b\s+16\.38 B\s+does not fit \(the most compact placement overflows disk "
                     r"with resident weights; disk with paged weights\)", out, re.M)
    assert re.search(r"^\s+gpu\s+total\s+[\d.]+ GiB of\s+80\.00 GiB: fits", out, re.M)
    assert re.search(r"^\s+disk\s+total\s+[\d.]+ GiB of\s+64\.00 GiB: fits", out, re.M)
    assert main(["--largest", "--gpu-gb=80", "--host-gb", "125", "--disk-gb=4096", "--tokens=4096"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+deepseek-moe-16b\s+16\.38 B\s+fits: expert state in host memory \+ NVMe, master fp32_split, "
                     r"moments fp32", out, re.M)


def test_plan_prints_the_state_format_and_the_largest_line(capsys):
    args = ["--preset=deepseek-moe-16b", "--model.offload.placement.tier=cpu", "--model.offload.state.master=bf16_sr",
            "--model.offload.state.moments=int8", "--gpu-gb=139", "--host-gb=125", "--disk-gb=64"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "expert state: master bf16_sr, moments int8: 4.031 B/param" in out
    # the 64 GiB disk holds OLMoE-1B-7B's download and checkpoint, no larger preset's (tests/offload/test_plan.py)
    assert re.search(r"^largest preset one GPU fully fine-tunes \(GPU 139 GiB, host 125 GiB, disk 64 GiB, 2048 tokens "
                     r"a micro-batch\): olmoe-1b-7b", out, re.M)
    # the expert-parallel table counts the compressed state too: 4.03 B/param of one rank's experts
    config = ModelConfig.from_preset("deepseek-moe-16b")
    host = expert_parallel_plan(config, 8, state_bytes=4.03125).host_offload
    row = re.search(r"^\s+8\s+8\s+[\d.]+ GiB\s+[\d.]+ GiB\s+([\d.]+) GiB", out, re.M)
    assert row and abs(float(row[1]) - host / GiB) < 0.06
    assert host == round(4.03125 * config.param_counts()["expert"] / 8)
    # several ranks load init_from through the fp32 model on each GPU and every expert's state in each store
    load = re.search(r"^\s+load with init_from on several ranks: .*\(([\d.]+) GiB\).*\(([\d.]+) GiB, host", out, re.M)
    counts = config.param_counts()
    assert load and abs(float(load[1]) - 4 * counts["total"] / GiB) < 0.06
    assert abs(float(load[2]) - 4.03125 * counts["expert"] / GiB) < 0.06


def test_plan_rejects_a_bad_flag(capsys):
    assert main(["--preset=tiny-mixtral", "--gpu-gb"]) == 2
    assert "--gpu-gb needs a value" in capsys.readouterr().err
