"""``moetrain fit``/``validate`` check every setting before the model is built.

Each bad setting must end the run with one paragraph naming the setting, exit status 2, no traceback, no run
directory, and without any model constructor having run (a spy on ``MoEForCausalLM.__init__`` counts them: random
initialisation, ``from_pretrained`` and the staged ``init_from`` load all construct one).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from moetrain.cli import main
from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf import export_hf
from moetrain.offload.config import OffloadConfig
from moetrain.offload.plan import make_plan, recipe_training
from moetrain.preflight import available_host_memory, check_config, resource_error_message

REPO = Path(__file__).resolve().parents[1]
HUGE = "deepseek-v3"  # 671 B parameters: its expert state (7 TiB and more) fits no machine's memory or disk


@pytest.fixture
def built_models(monkeypatch):
    """Every MoEForCausalLM constructed while the test runs (the real constructor still runs)."""
    calls = []
    real = MoEForCausalLM.__init__

    def spy(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("config"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(MoEForCausalLM, "__init__", spy)
    return calls


def fail_before_build(capsys, built_models, run_dir: Path, *args: str, subcommand: str = "fit") -> str:
    """Run the CLI on the tiny recipe with ``args``; check it failed early and cleanly; return its message."""
    status = main([subcommand, "--config", "recipes/tiny.yaml", f"--trainer.default_root_dir={run_dir}",
                   "--trainer.max_steps=2", *args])
    err = capsys.readouterr().err
    assert status == 2, err
    assert not built_models, f"a model was built before the error: {err}"
    assert "Traceback" not in err
    message = err.strip()
    assert message.startswith("moetrain: error:") and "\n\n" not in message, message  # one paragraph
    assert not run_dir.exists(), "nothing may be written for a run that cannot start"
    return " ".join(message.split())


@pytest.fixture
def hf_dir(tmp_path):
    """A tiny Hugging Face model directory (made before any spy is installed)."""
    out = tmp_path / "hf"
    export_hf(MoEForCausalLM(ModelConfig.from_preset("tiny-deepseek-moe", vocab_size=768)), out)
    return out


@pytest.mark.parametrize(("args", "named"), [
    (["--metrics.logger=null"], "metrics.logger='null'"),
    (["--metrics.heatmap_every_n_steps=-1"], "metrics.heatmap_every_n_steps"),
    (["--data.path=no/such.jsonl"], "data.path"),
    (["--data.val_path=no/such.jsonl"], "data.val_path"),
    (["--data.format=csv"], "data.format"),
    (["--data.tokenizer=no/such/tokenizer"], "data.tokenizer"),
    (["--model.config.vocab_size=256"], "model.config.vocab_size >= 683"),
    (["--model.offload.placement.tier=cpu", "--model.offload.placement.gpu_budget_gb=0.000001"],
     "model.offload.placement.gpu_budget_gb"),
    (["--checkpoint.every_n_steps=-1"], "checkpoint.every_n_steps"),
    (["--model.residual_dtype=fp16"], "model.residual_dtype='fp16'"),
    (["--model.expert_impl=fast"], "model.expert_impl='fast'"),
    (["--parallel.expert_parallel=0"], "parallel.expert_parallel"),
    (["--trainer.max_steps=-5"], "trainer.max_steps"),
    (["--trainer.accelerator=abacus"], "trainer.accelerator"),
    (["--ckpt_path=last"], "--ckpt_path=last"),
    (["--model.init_from=no/such/model", "--model.config=null"], "model.init_from=no/such/model"),
])
def test_bad_setting_fails_before_the_model_is_built(args, named, repo_cwd, built_models, capsys, tmp_path):
    message = fail_before_build(capsys, built_models, tmp_path / "run", *args)
    assert named in message


def test_validate_checks_before_the_build_too(repo_cwd, built_models, capsys, tmp_path):
    message = fail_before_build(capsys, built_models, tmp_path / "run", "--metrics.logger=null",
                                "--model.init_from=no/such/model", "--model.config=null", subcommand="validate")
    assert "metrics.logger" in message


def test_nvme_path_missing_is_one_paragraph_before_the_build(repo_cwd, built_models, capsys, tmp_path):
    missing = tmp_path / "no-such-folder"
    message = fail_before_build(capsys, built_models, tmp_path / "run", "--model.offload.placement.tier=nvme",
                                f"--model.offload.nvme.path={missing}")
    assert f"model.offload.nvme.path='{missing}' does not exist" in message


def test_nvme_path_that_is_a_file(repo_cwd, built_models, capsys, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("")
    message = fail_before_build(capsys, built_models, tmp_path / "run", "--model.offload.placement.tier=nvme",
                                f"--model.offload.nvme.path={file}")
    assert "is not a folder" in message and str(file) in message


def test_overflow_past_the_host_budget_needs_an_nvme_path(repo_cwd, built_models, capsys, tmp_path):
    message = fail_before_build(capsys, built_models, tmp_path / "run", "--model.offload.placement.tier=cpu",
                                "--model.offload.placement.cpu_budget_gb=0.000001")
    assert "model.offload.nvme.path=DIR" in message and "cpu_budget_gb" in message


def test_disk_too_small_for_the_swap(repo_cwd, built_models, capsys, tmp_path):
    swap = tmp_path / "swap"
    swap.mkdir()
    message = fail_before_build(capsys, built_models, tmp_path / "run", f"--model.preset={HUGE}", "--model.config=null",
                                "--model.offload.placement.tier=nvme", f"--model.offload.nvme.path={swap}",
                                "--data.tokenizer=data/tiny/tokenizer")
    assert f"model.offload.nvme.path='{swap}' has" in message and "GiB of swap" in message
    assert not list(swap.iterdir()), "no swap file may be created for a plan that does not fit"


def test_host_memory_too_small_for_the_expert_state(repo_cwd, built_models, capsys, tmp_path):
    message = fail_before_build(capsys, built_models, tmp_path / "run", f"--model.preset={HUGE}", "--model.config=null",
                                "--model.offload.placement.tier=cpu")
    assert "GiB of host memory" in message and "GiB are available" in message
    assert "model.offload.placement.cpu_budget_gb" in message or "model.preset" in message  # with a GPU / without one


def test_pinned_state_check_names_the_offload_settings(repo_cwd, tmp_path):
    """With a GPU the host holds only the pinned expert state: the message names the offload keys that shrink it."""
    from moetrain.cli import parse_config
    from moetrain.config import ConfigError

    config = parse_config(["fit", "--config", "recipes/tiny.yaml", f"--model.preset={HUGE}", "--model.config=null",
                           "--model.offload.placement.tier=cpu", f"--trainer.default_root_dir={tmp_path / 'run'}"])
    sections = config.as_dict()
    plan = make_plan(ModelConfig.from_preset(HUGE), OffloadConfig(tier="cpu"), **recipe_training(sections))
    available = available_host_memory()
    if available is None or plan.nvme_bytes or plan.host_bytes < available:
        pytest.skip("this machine's memory is unknown, or holds the expert state of the largest preset")
    with pytest.raises(ConfigError, match="pins .* GiB of host memory") as err:
        check_config(config, "fit", cuda=True)
    assert "model.offload.placement.cpu_budget_gb" in str(err.value)
    assert "model.offload.state.moments=bf16 or int8" in str(err.value)


@pytest.mark.parametrize("tier, fix", [("none", "model.offload.placement.tier=cpu"),
                                       ("cpu", "model.offload.placement.resident_weights=no")])
def test_a_model_whose_build_overflows_the_gpu_is_refused(repo_cwd, tmp_path, monkeypatch, tier, fix):
    """On an 80 GiB card Mixtral-8x7B's build alone does not fit: in fp32 without a tier (174 GiB), or as fp32 dense
    + bf16 experts with one (90 GiB; a random init streams its masters into the store as init_from does). The fit
    is refused before the build with the plan's load line and the setting that makes it fit; a 139 GiB card holds
    the second."""
    from moetrain.cli import parse_config
    from moetrain.config import ConfigError
    from moetrain.offload.plan import memory

    def fit(gpu_gib: int) -> None:
        monkeypatch.setattr(memory, "machine_capacity", lambda: (gpu_gib * 2**30, 2**50))
        config = parse_config(["fit", "--config", "recipes/tiny.yaml", "--model.preset=mixtral-8x7b",
                               "--model.config=null", f"--model.offload.placement.tier={tier}",
                               f"--trainer.default_root_dir={tmp_path / 'run'}"])
        check_config(config, "fit", cuda=True)

    with pytest.raises(ConfigError, match="does not fit the GPU while it is built") as err:
        fit(80)
    assert "gpu   peak at load" in str(err.value) and fix in str(err.value)
    assert ("the whole model in fp32" if tier == "none" else "random init streams") in str(err.value)
    if tier == "cpu":
        try:
            fit(139)
        except ConfigError as other:  # this machine's host memory may not hold the pinned state: not the GPU's line
            assert "while it is built" not in str(other)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the activations live in GPU memory")
def test_micro_batch_too_large_for_host_memory_without_a_gpu(repo_cwd, built_models, capsys, tmp_path):
    message = fail_before_build(capsys, built_models, tmp_path / "run", "--data.micro_batch_size=4000000")
    assert "without a GPU" in message and "data.micro_batch_size" in message


def test_a_missing_c_compiler_for_the_cpu_share_is_named_before_the_build(repo_cwd, built_models, capsys, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    message = fail_before_build(capsys, built_models, tmp_path / "run", "--model.offload.placement.tier=cpu",
                                "--model.offload.schedule.step_on=auto")
    assert "model.offload.schedule.cpu_adam=exact" in message and "no-such-cc" in message
    assert "step_on=gpu" in message


def test_init_from_without_a_config(repo_cwd, built_models, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = fail_before_build(capsys, built_models, tmp_path / "run", f"--model.init_from={empty}",
                                "--model.config=null")
    assert message.count("model.init_from") >= 1 and "config.json" in message


def test_init_from_of_an_unsupported_family(repo_cwd, built_models, capsys, tmp_path):
    model_dir = tmp_path / "gpt2"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    message = fail_before_build(capsys, built_models, tmp_path / "run", f"--model.init_from={model_dir}",
                                "--model.config=null")
    assert "model.init_from" in message and "gpt2" in message


def test_init_from_with_a_truncated_shard(repo_cwd, hf_dir, built_models, capsys, tmp_path):
    shard = sorted(hf_dir.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    message = fail_before_build(capsys, built_models, tmp_path / "run", f"--model.init_from={hf_dir}",
                                "--model.config=null", "--model.offload.placement.tier=cpu")
    assert shard.name in message and "truncated" in message


def test_init_from_with_a_tier_and_a_bad_nvme_path(repo_cwd, hf_dir, built_models, capsys, tmp_path):
    """init_from with a tier fills the expert store while loading: the swap folder is checked before that too."""
    message = fail_before_build(capsys, built_models, tmp_path / "run", f"--model.init_from={hf_dir}",
                                "--model.config=null", "--model.offload.placement.tier=nvme",
                                f"--model.offload.nvme.path={tmp_path / 'nope'}")
    assert "model.offload.nvme.path" in message and "does not exist" in message


def test_data_too_small_for_one_row_fails_before_the_build(repo_cwd, built_models, capsys, tmp_path):
    """A small corpus whose validation split holds less than one row: found by the data module's own packing."""
    lines = Path("data/tiny/train.jsonl").read_text().splitlines()[:20]
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(lines) + "\n")
    message = fail_before_build(capsys, built_models, tmp_path / "run", f"--data.path={small}",
                                "--data.val_path=null", "--data.val_split=0.05")
    assert "fewer than one sequence of data.seq_len=128" in message and "lower data.seq_len" in message


def test_a_run_tokenizes_its_data_once(repo_cwd, built_models, capsys, tmp_path, monkeypatch):
    """The preflight prepares the data; the data module the CLI builds adopts it instead of reading it again."""
    import moetrain.training.data as data_module

    read = []
    real = data_module.encode_records

    def spy(path, *args, **kwargs):
        read.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data_module, "encode_records", spy)
    status = main(["fit", "--config", "recipes/tiny.yaml", f"--trainer.default_root_dir={tmp_path / 'run'}",
                   "--trainer.max_steps=2"])
    err = capsys.readouterr().err
    assert status == 0, err
    assert sorted(read) == ["data/tiny/train.jsonl", "data/tiny/val.jsonl"]
    assert err.count("data (train):") == 1 and len(built_models) == 1


# ---------------------------------------------------------------------------------------------- at run time
def test_host_out_of_memory_names_the_settings():
    with pytest.raises(RuntimeError) as caught:
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: more than any address space
    message = resource_error_message(caught.value)
    assert message is not None and message.startswith("host memory ran out")
    assert "model.offload.placement.cpu_budget_gb" in message and "enforce fail" not in message


def test_full_disk_names_the_settings(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with pytest.raises(OSError) as caught, open("/dev/full", "wb") as full:
        full.write(b"x" * 4096)
        full.flush()
    assert caught.value.errno == errno.ENOSPC
    message = resource_error_message(caught.value)
    assert message is not None and "disk is full" in message
    assert "model.offload.nvme.path" in message and "trainer.default_root_dir" in message


def test_gpu_out_of_memory_names_the_settings():
    err = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                                 "79.11 GiB of which 3.12 GiB is free.")
    message = resource_error_message(err)
    assert message is not None and "data.micro_batch_size" in message and "model.offload.placement.tier=cpu" in message


def test_other_errors_are_not_explained_as_resources():
    assert resource_error_message(RuntimeError("shape mismatch")) is None
    assert resource_error_message(FileNotFoundError(errno.ENOENT, "nope", "x")) is None


def test_available_host_memory_is_at_most_physical_memory():
    available = available_host_memory()
    assert available is not None and 0 < available
    assert available <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
