"""``moetrain export`` (``export_main`` / ``convert_checkpoint``): a streaming re-write of a checkpoint as a
Hugging Face directory, checked by loading the result in transformers: every family with
``AutoModelForCausalLM`` (DeepSeek-MoE v1, which transformers does not ship, through the modelling code the
export writes beside the weights), with moetrain's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from moetrain.config import FAMILIES, ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf import export_hf, export_main, from_pretrained
from moetrain.shards import read_weight_map
from moetrain.training.checkpoint import save_checkpoint

# every family's tiny preset, plus DeepSeek-MoE with the options its tiny preset leaves off: renormalised top-k,
# MoE on every second layer from layer 0, no shared expert, tied embeddings
EXPORT_CASES = {family: ("tiny-" + family.replace("_", "-"), {}) for family in FAMILIES}
EXPORT_CASES["deepseek_moe_options"] = ("tiny-deepseek-moe", dict(
    norm_topk_prob=True, num_experts_per_tok=3, moe_layer_freq=2, first_k_dense_replace=0, num_shared_experts=0,
    tie_word_embeddings=True))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_export_of_a_run_directory_loads_in_transformers(tiny_hf, tmp_path):
    """A run directory's ``checkpoints/last`` is followed; --dtype casts; transformers reads the result."""
    hf = tiny_hf("qwen2_moe")
    model = from_pretrained(_save_fused(hf, tmp_path / "fused"))  # the fused layout, to exercise the re-keying
    step = tmp_path / "run" / "checkpoints" / "step-3"
    export_hf(model, step)
    (step.parent / "last").write_text("step-3\n")
    out = tmp_path / "out"
    assert export_main([str(tmp_path / "run"), str(out), "--dtype", "bfloat16", "--max-shard-mb", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    weight_map = read_weight_map(out)
    assert sorted(weight_map) == sorted(read_weight_map(step))
    name, fname = next(iter(weight_map.items()))
    with safe_open(str(out / fname), "pt") as f:
        assert f.get_tensor(name).dtype == torch.bfloat16
    ids = torch.randint(0, hf.config.vocab_size, (2, 8))
    ours = _logits(from_pretrained(out), ids)  # the bf16-rounded weights, run in fp32
    torch.testing.assert_close(_logits(type(hf).from_pretrained(out, dtype=torch.float32).eval(), ids), ours,
                               atol=1e-4, rtol=0)
    # and the bf16 rounding is all that changed
    torch.testing.assert_close(ours, _logits(from_pretrained(step), ids), atol=5e-2, rtol=0)


def _save_fused(hf, path):
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path / "model.safetensors"))
    hf.config.to_json_file(path / "config.json")
    return path


def test_export_keeps_the_stored_dtype_and_config(tmp_path):
    cfg = ModelConfig.from_preset("tiny-deepseek-moe", vocab_size=256, router_z_loss_coef=1e-3)
    src = tmp_path / "ckpt"
    export_hf(MoEForCausalLM(cfg), src)
    out = tmp_path / "out"
    assert export_main([str(src), str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert from_pretrained(out).config == cfg
    for a, b in zip(from_pretrained(src).state_dict().values(), from_pretrained(out).state_dict().values(),
                    strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_export_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert export_main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    src = tmp_path / "ckpt"
    export_hf(MoEForCausalLM(ModelConfig.from_preset("tiny-olmoe")), src)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    assert export_main([str(src), str(busy)]) == 2
    assert "not empty" in capsys.readouterr().err
    # a checkpoint missing a tensor: the error names it and no config.json is left behind
    index = json.loads((src / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    assert export_main([str(src), str(out)]) == 2
    assert "model.norm.weight" in capsys.readouterr().err
    assert not (out / "config.json").exists()


def _tiny_run(case: str, run_dir: Path, randomize) -> MoEForCausalLM:
    """A run directory holding one moetrain checkpoint of ``case``'s randomised model; returns the model."""
    preset, overrides = EXPORT_CASES[case]
    model = randomize(MoEForCausalLM(ModelConfig.from_preset(preset, **{"vocab_size": 256, **overrides}))).eval()
    save_checkpoint(run_dir, 1, model)
    return model


def _missing_code(model_dir: Path) -> list[str]:
    """The modules that config.json's ``auto_map`` names but ``model_dir`` lacks (transformers fails on them)."""
    refs = json.loads((model_dir / "config.json").read_text()).get("auto_map", {}).values()
    return sorted({ref.split(".")[0] for ref in refs if not (model_dir / (ref.split(".")[0] + ".py")).is_file()})


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_every_family_export_loads_with_automodel(case, randomize, tmp_path, capsys):
    """What the export's printed hint says to run: AutoModelForCausalLM (with trust_remote_code=True for
    DeepSeek-MoE, whose code the export writes) loads every tensor and gives moetrain's fp32 logits."""
    model = _tiny_run(case, tmp_path / "run", randomize)
    out = tmp_path / f"export-{case}"  # a name per case: transformers caches remote code by directory name
    assert export_main([str(tmp_path / "run"), str(out)]) == 0
    remote = model.config.family == "deepseek_moe"
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote,
                                                                 output_loading_info=True)
    printed = " ".join(capsys.readouterr().out.split())
    assert f"AutoModelForCausalLM.from_pretrained({str(out)!r}{', trust_remote_code=True' if remote else ''})" \
        in printed
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval().float()(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
    if remote:  # the export's own code generates too (Llama's cache and generate), token for token with moetrain
        from moetrain.generate import generate

        new = hf.generate(ids[:1], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones_like(ids[:1]))[0, 11:]
        assert new.tolist() == generate(model, ids[:1], max_new_tokens=6).tolist()


def test_deepseek_moe_config_json_never_names_missing_code(randomize, tmp_path):
    """DeepSeek-MoE's config.json names modelling files in its auto_map: wherever moetrain writes a config.json
    (a checkpoint, an export of it, a direct export_hf) those files are there, or there is no auto_map."""
    _tiny_run("deepseek_moe", tmp_path / "run", randomize)
    ckpt = tmp_path / "run" / "checkpoints" / "step-1"
    assert export_main([str(ckpt), str(tmp_path / "out")]) == 0
    export_hf(from_pretrained(ckpt), tmp_path / "direct")
    for model_dir in (ckpt, tmp_path / "out", tmp_path / "direct"):
        assert _missing_code(model_dir) == [], model_dir
    for model_dir in (tmp_path / "out", tmp_path / "direct"):  # the exports carry the code, the auto_map names it
        assert json.loads((model_dir / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
            "modeling_deepseek.DeepseekForCausalLM"
