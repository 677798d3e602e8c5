"""``moetrain export --ckpt DIR --out HF_DIR``: a training checkpoint becomes a Hugging Face directory that
transformers loads with the same logits as moetrain (fp32, 1e-4), tokenizer files included."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
import yaml
from ckpt_harness import TINY, fit, last, small_data, write_recipe

from moetrain.cli import main
from moetrain.models.hf import from_pretrained
from moetrain.optim import DenseAdamW, OptimizerConfig
from moetrain.training.checkpoint import load_model, save_checkpoint


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_exported_checkpoint_loads_in_transformers_with_equal_logits(family, tiny_hf, save_hf, tmp_path):
    model = from_pretrained(save_hf(tiny_hf(family), "src")).train()
    opt = DenseAdamW(model, OptimizerConfig(lr=1e-2))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    model(ids, labels=ids).loss.backward()  # one real step, so the checkpoint carries optimizer state too
    opt.step(1e-2)
    ckpt = save_checkpoint(tmp_path / "run", 1, model, optimizer=opt, max_shard_bytes=64 * 1024)
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    assert not list(out.glob("optimizer*")), "an export holds the model only"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.model_type == json.loads((ckpt / "config.json").read_text())["model_type"]
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    expected = logits(model.eval(), ids)
    torch.testing.assert_close(logits(hf, ids), expected, rtol=1e-4, atol=1e-4)
    assert (expected - logits(from_pretrained(tmp_path / "src"), ids)).abs().max() > 1e-4  # the step moved it


def test_fit_from_hf_weights_then_export_with_tokenizer_and_bf16(tmp_path):
    """init_from a Hugging Face directory, train 2 steps through the CLI, export with the run's tokenizer."""
    cfg = transformers.Qwen3MoeConfig(vocab_size=768, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=16)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "base", max_shard_size="100KB")
    recipe_path = write_recipe(tmp_path, small_data(tmp_path), "cpu")
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["model"].update(config=None, init_from=str(tmp_path / "base"))
    recipe_path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    assert fit(recipe_path, run, "--trainer.max_steps=2") == 0
    trained = load_model(last(run)).eval()
    out, out16 = tmp_path / "hf", tmp_path / "hf16"
    assert main(["export", "--ckpt", str(run), "--out", str(out)]) == 0
    assert main(["export", "--ckpt", str(last(run)), "--out", str(out16), "--dtype", "bf16"]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = (TINY / "val.jsonl").read_text().splitlines()[0][10:80]
    assert tok(text)["input_ids"] == transformers.AutoTokenizer.from_pretrained(TINY / "tokenizer")(text)["input_ids"]
    ids = torch.tensor([tok(text)["input_ids"][:16]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(hf, ids), logits(trained, ids), rtol=1e-4, atol=1e-4)
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(out16)
    assert hf16.dtype == torch.bfloat16 and json.loads((out16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    assert (logits(base, ids) - logits(hf, ids)).abs().max() > 1e-3  # fine-tuning changed the exported model
