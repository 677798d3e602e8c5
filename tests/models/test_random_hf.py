"""Random Hugging Face directories (``scripts/make_random_hf.py``): every family's directory holds the names an
export writes and the seeded init's values, loads in moetrain and in transformers (DeepSeek-MoE through the
code it carries) with equal logits, and goes through the front door: ``moetrain fit`` with ``model.init_from``
and ``moetrain plan``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import moetrain
from moetrain.cli import main as cli_main
from moetrain.config import FAMILIES, ConfigError
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf import export_hf
from moetrain.models.random_hf import INDEX, main, plan_shards, preset_config, tensor_layout, write_random_hf
from moetrain.models.random_init import build_random
from moetrain.shards import read_weight_map
from moetrain.training.callbacks import read_metrics

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "tiny"
# a few shards of a 2-layer cut: every family's tiny preset, with DeepSeek's dense first layer kept
SHARD = 96 * 1024


def _scale_matrices(model: torch.nn.Module, factor: float) -> None:
    """Multiply every matrix (and stacked experts) by ``factor``: at the init's std 0.02 the layers move the
    logits by less than the comparison's tolerance, so a wrongly named tensor would go unseen; scaled alike in
    both models, the function stays the same only if both read the same values into the same places."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(factor)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_in_moetrain_and_transformers(family, tmp_path):
    config = preset_config("tiny-" + family.replace("_", "-"), layers=2, overrides={"vocab_size": 256})
    out = tmp_path / f"random-{family}"  # a name per family: transformers caches remote code by directory name
    weight_map = write_random_hf(config, out, dtype="bf16", seed=7, max_shard_bytes=SHARD)

    # the names and the index of an export of the same shape, in several shards; bf16 but the V3 routing bias
    export_hf(MoEForCausalLM(config), tmp_path / "export")
    assert sorted(weight_map) == sorted(read_weight_map(tmp_path / "export")) == sorted(read_weight_map(out))
    assert len(set(weight_map.values())) > 1
    index = json.loads((out / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(e.nbytes for e in tensor_layout(config, torch.bfloat16))
    for name, fname in weight_map.items():
        with safe_open(str(out / fname), "pt") as f:
            want = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
            assert f.get_slice(name).get_dtype() == {torch.float32: "F32", torch.bfloat16: "BF16"}[want], name
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "moetrain_config.json").exists()  # the config comes from config.json, as for a download

    # moetrain reads the seeded init's values, rounded to bf16 (the routing bias kept in fp32)
    ours = moetrain.from_pretrained(out)
    assert ours.config == config.__class__(**{**config.to_dict(), "name": out.name})
    expected = build_random(config, 7).state_dict()
    for name, tensor in ours.state_dict().items():
        want = expected[name] if name.endswith("e_score_correction_bias") else expected[name].bfloat16().float()
        assert torch.equal(tensor, want), name

    remote = family == "deepseek_moe"  # transformers has no class for it: the directory carries DeepSeek's code
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=remote,
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    ids = torch.randint(0, 256, (2, 10))
    for factor in (1.0, 5.0):
        _scale_matrices(hf, factor)
        _scale_matrices(ours, factor)
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, hf(ids).logits.float(), atol=1e-4, rtol=0)


def test_shards_are_cut_by_bytes_and_config_json_comes_last(tmp_path):
    config = preset_config("tiny-olmoe", layers=2)
    entries = tensor_layout(config, torch.float32)
    shards = plan_shards(entries, 50_000)
    assert [e for shard in shards for e in shard] == entries
    for shard in shards:  # a shard only exceeds the limit when one tensor alone does
        assert sum(e.nbytes for e in shard) <= 50_000 or len(shard) == 1
    weight_map = write_random_hf(config, tmp_path / "fp32", dtype="fp32", max_shard_bytes=50_000)
    assert len(set(weight_map.values())) == len(shards)
    for fname in set(weight_map.values()):
        assert (tmp_path / "fp32" / fname).stat().st_size <= 50_000 + 8 + 4096 or \
            sum(1 for v in weight_map.values() if v == fname) == 1

    with pytest.raises(ConfigError, match="not an empty directory"):
        write_random_hf(config, tmp_path / "fp32")
    # a tokenizer directory without a tokenizer fails after the weights: no config.json, nothing looks loadable
    (tmp_path / "empty-tokenizer").mkdir()
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        write_random_hf(config, tmp_path / "half", tokenizer=tmp_path / "empty-tokenizer")
    assert (tmp_path / "half" / INDEX).exists() and not (tmp_path / "half" / "config.json").exists()
    assert not list((tmp_path / "half").glob("*.part"))


def test_script_writes_a_directory_and_reports_bad_input(tmp_path, capsys):
    out = tmp_path / "olmoe"
    assert main(["--preset", "olmoe-1b-7b", "--layers", "1", "--set", "vocab_size=128", "--set", "hidden_size=64",
                 "--set", "num_attention_heads=4", "--set", "num_key_value_heads=4", "--set", "num_experts=4",
                 "--set", "num_experts_per_tok=2", "--set", "moe_intermediate_size=32", "--dtype", "fp32",
                 "--shard-gb", "0.0001", "--device", "cpu", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "1 layers" in captured.err and "shards written" in captured.err and "GB/s" in captured.err
    assert f"to {out}" in captured.out
    model = moetrain.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and model.config.vocab_size == 128 and model.config.family == "olmoe"
    assert main(["--preset", "tiny-olmoe", "--set", "vocab_size", "--out", str(tmp_path / "x")]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["--preset", "no-such-preset", "--out", str(tmp_path / "y")]) == 2
    assert "not found" in capsys.readouterr().err


def test_fit_and_plan_take_the_generated_directory(tmp_path, capsys):
    """The front door: ``moetrain fit --model.init_from=DIR`` (experts streamed into their tier) starts from the
    generated weights, and ``moetrain plan`` plans the directory's shape."""
    model_dir = tmp_path / "random-tiny"
    config = preset_config("tiny-deepseek-moe", layers=2, overrides={"vocab_size": 768})
    write_random_hf(config, model_dir, dtype="bf16", seed=3, max_shard_bytes=2**20)
    run = tmp_path / "run"
    assert cli_main(["fit", "--config", str(ROOT / "recipes" / "tiny.yaml"), f"--model.init_from={model_dir}",
                     "--model.config=null", "--model.offload.placement.tier=cpu", "--trainer.accelerator=cpu",
                     "--trainer.max_steps=2", "--data.seq_len=32", "--data.micro_batch_size=2",
                     f"--data.path={DATA / 'train.jsonl'}", f"--data.tokenizer={model_dir}",
                     f"--trainer.default_root_dir={run}"]) == 0
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    # near-uniform predictions from a std-0.02 init: the cross-entropy of a uniform guess over the vocabulary
    assert abs(metrics[0]["loss"] - torch.log(torch.tensor(768.0)).item()) < 0.05
    # two small steps away from the generated weights (a different init would be ~0.03 away everywhere)
    start = moetrain.from_pretrained(model_dir).state_dict()
    trained = moetrain.from_pretrained(run).state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.experts.0.up_proj.weight", "lm_head.weight"):
        assert 0 < (trained[name] - start[name]).abs().max() < 0.01, name

    capsys.readouterr()
    assert cli_main(["plan", "--config", str(ROOT / "recipes" / "deepseek-moe-16b.yaml"),
                     f"--model.init_from={model_dir}", "--gpu-gb=80", "--disk-gb=64"]) == 0
    printed = capsys.readouterr().out
    assert "not here" not in printed  # the directory's config.json and its safetensors, not the preset's shape
    assert "init_from directory (its safetensors)" in printed
    dense, expert = config.param_counts()["dense"], config.param_counts()["expert"]
    assert f"{dense / 1e6:.2f} M dense + {expert / 1e6:.2f} M in routed experts" in printed
