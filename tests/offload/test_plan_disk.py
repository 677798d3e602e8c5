"""The planner's disk tier and host load peak: a checkpoint's bytes against what a save writes, the checkpoints on
disk at once against the rotation itself, the ``init_from`` directory + swap + checkpoints against the free disk,
the fp32 model of a random initialisation in the host peak, and the lines a refused configuration is shown."""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from offload_harness import OPTIM, batches, tiny_model, train

from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf import load_config
from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig, resolve_section
from moetrain.offload.plan import (
    CHECKPOINT_DEFAULTS,
    HF_SHARD_BYTES,
    SAVE_SHARDS_IN_FLIGHT,
    Storage,
    checkpoint_bytes,
    checkpoints_on_disk,
    count_parameters,
    main,
    make_plan,
    plan_from_recipe,
    plan_overflows,
)
from moetrain.training.checkpoint import rotate, save_checkpoint, shard_header
from moetrain.training.checkpoint_callback import CheckpointCallback

GiB = 2**30


def tensor_bytes(ckpt: Path) -> int:
    """Bytes of the tensors in a checkpoint's safetensors shards (model and optimizer), from their headers."""
    total = 0
    for shard in ckpt.glob("*.safetensors"):
        total += sum(stop - start for name, info in shard_header(shard).items() if name != "__metadata__"
                     for start, stop in [info["data_offsets"]])
    return total


@pytest.mark.parametrize("tier,master,moments", [("none", "fp32", "fp32"), ("cpu", "fp32", "fp32"),
                                                 ("cpu", "bf16_kahan", "bf16"), ("cpu", "bf16_sr", "int8")])
def test_checkpoint_bytes_are_what_a_save_writes(tmp_path, tier, master, moments):
    """fp32 weights whatever the master format, fp32 dense moments, the experts' moments as stored; the model's
    persistent buffers are the only other tensors (bytes)."""
    model = tiny_model(num_experts=16)
    off = OffloadConfig(tier=tier, master=master, moments=moments, gpu_slots=4)
    opt = build_optimizer(model, OPTIM, off)
    train(model, opt, batches(steps=2, tokens=256), total=2)  # 256 tokens x top-2: every expert gets state
    ckpt = save_checkpoint(tmp_path, 2, model, optimizer=opt)
    dense, expert, _ = count_parameters(model.config)
    params = {name for name, _ in model.named_parameters()}
    buffers = sum(t.numel() * t.element_size() for name, t in model.state_dict().items() if name not in params)
    assert buffers < 1e-2 * checkpoint_bytes(dense, expert, offload=off)
    assert tensor_bytes(ckpt) == checkpoint_bytes(dense, expert, offload=off) + buffers
    if hasattr(opt, "close"):
        opt.close()


@pytest.mark.parametrize("every,max_steps,save_final,keep_last", [
    (200, 1000, True, 0), (200, 1000, True, 1), (200, 1000, True, 2), (300, 1000, True, 0), (300, 1000, True, 1),
    (0, 1000, True, 0), (0, 1000, True, 1), (0, 1000, False, 0), (300, 1000, False, 0), (400, 1000, True, 9)])
def test_checkpoints_on_disk_are_the_most_the_rotation_leaves(tmp_path, every, max_steps, save_final, keep_last):
    """Replays the callback's schedule (a save every ``every`` steps, the final one unless the last step saved) on
    empty step directories with the real :func:`rotate`, counting the directories present after each write."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    steps = [s for s in range(1, max_steps + 1) if every and s % every == 0]
    if save_final and (not steps or steps[-1] != max_steps):
        steps.append(max_steps)
    most = 0
    for step in steps:
        (root / f"step-{step}").mkdir()
        (root / "last").write_text(f"step-{step}\n")
        most = max(most, sum(1 for p in root.iterdir() if p.is_dir()))
        if keep_last:
            rotate(root, keep_last)
    assert checkpoints_on_disk(every, max_steps, save_final=save_final, keep_last=keep_last)[0] == most


def test_checkpoint_defaults_are_the_callbacks():
    signature = inspect.signature(CheckpointCallback.__init__).parameters
    assert {k: signature[k].default for k in CHECKPOINT_DEFAULTS if k != "async"} == \
        {k: v for k, v in CHECKPOINT_DEFAULTS.items() if k != "async"}
    assert CheckpointCallback().async_save is CHECKPOINT_DEFAULTS["async"]


def tiny_recipe(init_from: str, swap: str, run_dir: str, **checkpoint) -> dict:
    """tiny-mixtral from ``init_from`` (its preset's shape until it is there), a quarter of the expert state in
    host memory and the rest swapped to ``swap``, checkpoints into ``run_dir``."""
    config = ModelConfig.from_preset("tiny-mixtral")
    _, expert, _ = count_parameters(config)
    return {"trainer": {"max_steps": 100, "default_root_dir": run_dir},
            "model": {"preset": "tiny-mixtral", "init_from": init_from,
                      "offload": {"placement": {"tier": "cpu", "cpu_budget_gb": 3 * expert / 4 / GiB},
                                  "nvme": {"path": swap}}},
            "data": {"seq_len": 16}, "checkpoint": {"every_n_steps": 25, "keep_last": 1, "max_shard_mb": 1,
                                                    **checkpoint}}


def test_disk_tier_counts_the_model_directory_the_swap_and_the_checkpoints(tmp_path, tiny_hf, save_hf):
    """Before the download: the preset in bf16 + the swap + keep_last 1 -> 2 checkpoints, against ``disk_free``.
    Downloaded: its safetensors' bytes when the free space is given (the free disk before the download), nothing
    when it is measured here (the directory is already in the disk's used space)."""
    missing, swap = tmp_path / "not-downloaded", tmp_path / "swap"
    recipe = tiny_recipe(str(missing), str(swap), str(tmp_path / "run"))
    config = ModelConfig.from_preset("tiny-mixtral")
    dense, expert, _ = count_parameters(config)
    off = resolve_section(recipe["model"]["offload"])
    plan = plan_from_recipe(recipe, gpu_capacity=GiB, host_capacity=64 * GiB, disk_free=GiB)
    assert plan.nvme_bytes > 0 and "nvme" not in plan.fits()  # one disk: the swap is part of the disk tier
    one = checkpoint_bytes(dense, expert, offload=off)
    assert plan.disk_bytes == 2 * (dense + expert) + plan.nvme_bytes + 2 * one
    rows = {what: n for tier, what, n in plan.breakdown if tier == "disk"}
    assert rows == {"expert state (NVMe swap)": plan.nvme_bytes, "checkpoints: 2 x 0.00 GiB": 2 * one,
                    "init_from directory, not here yet (the preset in bf16)": 2 * (dense + expert)}
    # a checkpoint save holds two shards in host memory while training
    assert plan.host_bytes - plan_from_recipe({**recipe, "checkpoint": {"every_n_steps": 0, "save_final": False}},
                                              host_capacity=64 * GiB, disk_free=GiB).host_bytes \
        == SAVE_SHARDS_IN_FLIGHT * 2**20
    # ... at most the checkpoint itself, twice
    large = plan_from_recipe({**recipe, "checkpoint": {"max_shard_mb": 4096}}, host_capacity=64 * GiB, disk_free=GiB)
    assert ("host", "checkpoint save: 2 shards in flight (max_shard_mb 4096)", 2 * one) in large.breakdown
    downloaded = Path(save_hf(tiny_hf("mixtral"), "mixtral"))
    recipe["model"]["init_from"] = str(downloaded)
    shards = sum(f.stat().st_size for f in downloaded.glob("*.safetensors"))
    given = plan_from_recipe(recipe, gpu_capacity=GiB, host_capacity=64 * GiB, disk_free=GiB)
    dense, expert, _ = count_parameters(load_config(downloaded))  # the downloaded shape, not the preset's
    one = checkpoint_bytes(dense, expert, offload=off)
    assert given.disk_bytes == shards + given.nvme_bytes + 2 * one
    measured = plan_from_recipe(recipe, gpu_capacity=GiB, host_capacity=64 * GiB)
    assert measured.disk_bytes == measured.nvme_bytes + 2 * one
    assert measured.disk_free == pytest.approx(shutil.disk_usage(tmp_path).free, rel=0.01)
    # reading it holds one shard at a time
    save = next(n for _, what, n in given.breakdown if what.startswith("checkpoint save"))
    assert given.host_load_bytes - (given.host_bytes - save) == max(
        f.stat().st_size for f in downloaded.glob("*.safetensors"))


SECOND_FILESYSTEM = Path("/dev/shm")


@pytest.mark.skipif(not SECOND_FILESYSTEM.is_dir()
                    or os.stat(SECOND_FILESYSTEM).st_dev == os.stat(tempfile.gettempdir()).st_dev,
                    reason="needs a second filesystem (/dev/shm)")
def test_a_swap_folder_on_another_filesystem_is_its_own_tier(tmp_path):
    with tempfile.TemporaryDirectory(dir=SECOND_FILESYSTEM) as swap:
        recipe = tiny_recipe(str(tmp_path / "not-downloaded"), swap, str(tmp_path / "run"))
        plan = plan_from_recipe(recipe, gpu_capacity=GiB, host_capacity=64 * GiB)
        assert plan.swap_separate and plan.fits()["nvme"] is True and plan.swap_free > 0
        assert ("nvme", "expert state (NVMe swap)", plan.nvme_bytes) in plan.breakdown
        assert plan.disk_bytes == sum(n for tier, _, n in plan.breakdown if tier == "disk")
        assert plan.nvme_bytes not in [n for tier, _, n in plan.breakdown if tier == "disk"]
        assert "  nvme  total" in plan.format()


def test_a_plan_whose_disk_overflows_says_which_line(tmp_path, capsys):
    recipe = tiny_recipe(str(tmp_path / "not-downloaded"), str(tmp_path / "swap"), str(tmp_path / "run"))
    machine = {"gpu_capacity": 8 * GiB, "host_capacity": 64 * GiB}
    plan = plan_from_recipe(recipe, **machine, disk_free=GiB)
    assert plan.fits_all() and plan_overflows(plan) == []
    small = plan_from_recipe(recipe, **machine, disk_free=plan.disk_bytes - 1)
    assert small.fits() == {"gpu": True, "host": True, "disk": False}
    lines = plan_overflows(small)
    assert len(lines) == 1 and lines[0].startswith("disk  total") and lines[0].endswith("DOES NOT FIT")
    assert f"  {lines[0]}" in small.format().splitlines()
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["--config", str(path), "--gpu-gb=8", "--host-gb=64", f"--disk-gb={(plan.disk_bytes - 1) / GiB}"]) == 0
    assert f"  {lines[0]}" in capsys.readouterr().out.splitlines()


def _param_bytes(model: torch.nn.Module) -> int:
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values())


@pytest.mark.parametrize("tier", ["cpu", "none"])
def test_host_peak_at_load_of_a_random_init_counts_the_fp32_model(tier):
    """A random initialisation builds the fp32 model in host memory, next to the pinned state: the host's load peak
    is its training footprint (without a save in flight) plus the model's bytes, and a host between the two does
    not fit, the load line saying why. ``init_from`` reads one shard at a time instead."""
    model = MoEForCausalLM(ModelConfig.from_preset("tiny-mixtral"))
    storage = Storage(checkpoints=1, max_shard_bytes=1024)  # a save holds less than the tiny model
    off = OffloadConfig(tier=tier)
    random = make_plan(model.config, off, 64, gpu_capacity=8 * GiB, host_capacity=64 * GiB, storage=storage)
    resident = random.host_bytes - SAVE_SHARDS_IN_FLIGHT * 1024
    assert random.host_load_bytes == resident + _param_bytes(model)
    assert "random init builds the fp32 model in host memory" in random.format()
    fine_tune = make_plan(model.config, off, 64, streamed_load=tier != "none", from_checkpoint=True,
                          host_capacity=64 * GiB, storage=storage)
    assert fine_tune.host_load_bytes == resident + HF_SHARD_BYTES
    squeezed = make_plan(model.config, off, 64, gpu_capacity=8 * GiB, host_capacity=random.host_load_bytes - 1,
                         storage=storage)
    assert random.host_bytes <= squeezed.host_capacity and squeezed.fits()["host"] is False
    lines = plan_overflows(squeezed)
    assert lines[0].startswith("host  total") and "DOES NOT FIT (peak at load" in lines[0]
    assert lines[1].startswith("host  peak at load") and "fp32 model" in lines[1]


def test_a_large_random_init_has_no_host_copy():
    """From ``SEEDED_INIT_MIN_PARAMS`` parameters on, a random initialisation is filled on the GPU
    (training/model_build.py ``random_model``): the host's load peak is its pinned state; the GPU's is the fp32
    model without a tier, and under a tier fp32 dense + bf16 experts (the masters stream into the store as drawn,
    ``staged_init.random_into_tiers``), as with init_from."""
    from moetrain.models.random_init import SEEDED_INIT_MIN_PARAMS

    config = ModelConfig.from_preset("deepseek-moe-16b")
    dense, expert, _ = count_parameters(config)
    assert dense + expert >= SEEDED_INIT_MIN_PARAMS > ModelConfig.from_preset("tiny-mixtral").param_counts()["total"]
    plan = make_plan(config, OffloadConfig(tier="cpu"), 2048, gpu_capacity=139 * GiB, host_capacity=1024 * GiB,
                     storage=Storage(checkpoints=1), from_checkpoint=False)
    save = next(n for _, what, n in plan.breakdown if what.startswith("checkpoint save"))
    assert plan.host_load_bytes == plan.host_bytes - save
    assert plan.gpu_load_bytes == 4 * dense + 2 * expert
    assert "random init streams the experts' masters into the tier: fp32 dense + 2 B/param experts" in plan.format()
    assert "random init draws the experts one tensor at a time on the GPU (no host copy)" in plan.format()
    whole = make_plan(config, OffloadConfig(tier="none"), 2048, gpu_capacity=139 * GiB, host_capacity=1024 * GiB,
                      storage=Storage(checkpoints=1), from_checkpoint=False)
    assert whole.gpu_load_bytes == 4 * (dense + expert)
    assert "random init builds the fp32 model on the GPU (no host copy)" in whole.format()


def test_gpu_load_overflow_names_the_load_line():
    """A GPU that holds neither the training footprint nor the fp32 model of a small random initialisation (built
    in fp32 on the CPU, then moved): its total line and its load line are the overflow."""
    config = ModelConfig.from_preset("tiny-mixtral")
    off = OffloadConfig(tier="cpu", hot_cache_gb=0)
    plan = make_plan(config, off, 64, gpu_capacity=1024 * GiB, host_capacity=1024 * GiB, layerwise_grads=True)
    squeezed = make_plan(config, off, 64, gpu_capacity=plan.gpu_load_bytes - 1, host_capacity=1024 * GiB,
                         layerwise_grads=True)
    lines = plan_overflows(squeezed)
    assert len(lines) == 2 and lines[0].startswith("gpu   total") and "DOES NOT FIT" in lines[0]
    assert lines[1] == squeezed.load_lines()["gpu"] and "the whole model in fp32" in lines[1]
