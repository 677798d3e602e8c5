"""``moetrain export`` (``export_main`` / ``convert_checkpoint``): a streaming re-write of a checkpoint as a
Hugging Face directory, checked by loading the result in transformers."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf import export_hf, export_main, from_pretrained
from moetrain.shards import read_weight_map


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
    assert "not a directory" in capsys.readouterr().err
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
