"""Expert pruning: kept experts' weights, router rows and routing biases move exactly; a token routed only to
kept experts gets the unpruned output (renormalized top-k) or the same experts' outputs (every family); the
pruned directory loads in transformers with moetrain's logits; ``moetrain prune`` on the tiny recipe's model
reports the validation loss before and after and writes a directory that loads like any other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import moetrain
from moetrain.config import ConfigError, ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf import export_hf
from moetrain.models.router import Routing
from moetrain.prune import experts_to_keep, main, prune_model, validation_loss

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "data" / "tiny"
TINY_PRESETS = sorted(p.stem for p in (REPO / "configs" / "models").glob("tiny-*.yaml"))


def _model(preset: str, randomize) -> MoEForCausalLM:
    model = randomize(MoEForCausalLM(ModelConfig.from_preset(preset))).eval()
    with torch.no_grad():
        for block in model.moe_blocks():
            if block.gate.e_score_correction_bias is not None:
                block.gate.e_score_correction_bias.normal_(0.0, 0.3)
    return model


def _half(model: MoEForCausalLM, x: torch.Tensor) -> dict[int, list[int]]:
    """Keep the half of every layer's experts that route most of ``x`` (T, H) (per group where the router has
    groups), as ``moetrain prune`` scores them on data."""
    with torch.no_grad():
        scores = {b.layer_idx: b.gate(x, batch_size=1).counts.double() for b in model.moe_blocks()}
    return experts_to_keep(scores, model.config, keep=model.config.num_experts // 2)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_pruning_keeps_the_kept_experts_exactly(preset, randomize):
    model = _model(preset, randomize)
    x = torch.randn(64, model.config.hidden_size)  # (T, H) inputs of the MoE blocks
    kept = _half(model, x)
    pruned = prune_model(model, kept)
    assert pruned.config.num_experts == model.config.num_experts // 2
    for old, new in zip(model.moe_blocks(), pruned.moe_blocks(), strict=True):
        ids = torch.tensor(kept[old.layer_idx])
        assert torch.equal(new.gate.weight, old.gate.weight[ids])
        if old.gate.e_score_correction_bias is not None:
            assert torch.equal(new.gate.e_score_correction_bias, old.gate.e_score_correction_bias[ids])
        with torch.no_grad():
            routing = old.gate(x, batch_size=1)
            on_kept = torch.isin(routing.topk_idx, ids).all(dim=1)  # (T,) tokens routed only to kept experts
            assert on_kept.any()
            # the same routing, renumbered: the kept experts' outputs are the unpruned ones, bit for bit
            renumber = torch.full((model.config.num_experts,), -1, dtype=torch.long)
            renumber[ids] = torch.arange(len(ids))
            sub = Routing(topk_idx=renumber[routing.topk_idx[on_kept]], topk_weight=routing.topk_weight[on_kept],
                          counts=torch.bincount(renumber[routing.topk_idx[on_kept]].reshape(-1),
                                                minlength=len(ids)),
                          logits=routing.logits[on_kept], aux_loss=routing.aux_loss)
            assert torch.equal(new.experts(x[on_kept], sub), old.experts(x[on_kept], Routing(
                topk_idx=routing.topk_idx[on_kept], topk_weight=routing.topk_weight[on_kept],
                counts=torch.bincount(routing.topk_idx[on_kept].reshape(-1), minlength=model.config.num_experts),
                logits=routing.logits[on_kept], aux_loss=routing.aux_loss)))
            if model.config.norm_topk_prob:
                # renormalized top-k: the pruned router picks the same experts with the same weights for these
                # tokens (DeepSeek-V3 keeps whole groups' ranks only where the group's best experts are kept)
                again = new.gate(x[on_kept], batch_size=1)
                same = (renumber[routing.topk_idx[on_kept]].sort(dim=1).values == again.topk_idx.sort(dim=1).values
                        ).all(dim=1)
                if model.config.topk_method == "greedy":
                    assert same.all()
                assert same.float().mean() >= 0.5
                want = old(x[None, on_kept][:, same])[0]
                got = new(x[None, on_kept][:, same])[0]
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # the weights renormalized in fp32


def test_keep_rounds_to_whole_groups_and_caps_top_k(randomize):
    model = _model("tiny-deepseek-v3", randomize)  # 16 experts in 4 groups, 2 groups per token, top-2
    scores = {b.layer_idx: torch.arange(16, dtype=torch.float64) for b in model.moe_blocks()}
    kept = experts_to_keep(scores, model.config, keep=3)  # rounded up to whole groups of 2 (noaux_tc ranks pairs)
    assert all(ids == [2, 3, 6, 7, 10, 11, 14, 15] for ids in kept.values())
    assert prune_model(model, kept).config.num_experts_per_tok == 2
    mixtral = _model("tiny-mixtral", randomize)  # 4 experts top-2
    one = experts_to_keep({b.layer_idx: torch.rand(4) for b in mixtral.moe_blocks()}, mixtral.config, keep=1)
    assert prune_model(mixtral, one).config.num_experts_per_tok == 1
    with pytest.raises(ConfigError, match="exactly one"):
        experts_to_keep(scores, model.config)
    with pytest.raises(ConfigError, match="--keep 17"):
        experts_to_keep(scores, model.config, keep=17)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_pruned_model_loads_in_transformers(preset, randomize, tmp_path):
    model = _model(preset, randomize)
    pruned = prune_model(model, _half(model, torch.randn(64, model.config.hidden_size)))
    out = tmp_path / f"pruned-{preset}"  # a name per case: transformers caches remote code by directory name
    export_hf(pruned, out)
    remote = pruned.config.family == "deepseek_moe"
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote,
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval().float()(ids).logits, pruned(ids).logits, atol=1e-4, rtol=0)


def test_prune_command_on_the_tiny_recipe_model(randomize, tmp_path, capsys):
    """The tiny recipe's model shape pruned to half its experts on the tiny corpus; the report's losses are the
    losses of the written directories, which load as a Hugging Face directory and as a run directory."""
    model = randomize(MoEForCausalLM(ModelConfig.from_preset("tiny-deepseek-moe", vocab_size=768)), std=0.05)
    export_hf(model, tmp_path / "src")
    out = tmp_path / "pruned"
    assert main(["--ckpt", str(tmp_path / "src"), "--data", str(TINY / "train.jsonl"), "--val_data",
                 str(TINY / "val.jsonl"), "--tokenizer", str(TINY / "tokenizer"), "--keep", "8", "--out", str(out),
                 "--seq_len", "128"]) == 0
    captured = capsys.readouterr()
    result = json.loads(next(line for line in captured.out.splitlines() if line.startswith("RESULT "))[7:])
    assert result["experts_before"] == 16 and result["experts_after"] == 8
    assert "validation loss" in captured.err
    report = json.loads((out / "prune_report.json").read_text())
    assert all(len(ids) == 8 for ids in report["kept"].values())
    from moetrain.prune import read_rows, row_batches
    from moetrain.training.tokenizer import load_tokenizer

    batches = row_batches(read_rows(TINY / "val.jsonl", load_tokenizer(TINY / "tokenizer"), 128), 8,
                          torch.device("cpu"))
    assert validation_loss(model, batches) == pytest.approx(result["val_loss_before"], abs=1e-6)
    assert (out / "checkpoints" / "last").read_text().strip() == "step-0"
    for loaded in (moetrain.from_pretrained(out), moetrain.from_pretrained(out / "checkpoints" / "step-0")):
        assert loaded.config.num_experts == 8
        assert validation_loss(loaded, batches) == pytest.approx(result["val_loss_after"], abs=1e-6)
    assert main(["--ckpt", str(tmp_path / "src"), "--data", str(TINY / "train.jsonl"), "--keep", "8", "--out",
                 str(out), "--tokenizer", str(TINY / "tokenizer")]) == 2
    assert "not empty" in capsys.readouterr().err
