"""Parity with Hugging Face transformers: tiny random models of each family are saved with
``save_pretrained`` (sharded), loaded with ``moetrain.from_pretrained`` (the converter users run), and
must give the same fp32 logits, padded batches included; moetrain's export must load back into
transformers with the same logits; the Switch balance loss of each layer must equal transformers'
``load_balancing_loss_func`` on that layer's router logits.
"""

from __future__ import annotations

import pytest
import torch
from parity_helpers import VOCAB, assert_export_round_trip, assert_logits_match, padded_batch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import moetrain

CASES = ["mixtral", "mixtral_sliding", "qwen2_moe", "qwen2_moe_sparse_step", "qwen3_moe", "olmoe"]  # see conftest


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tiny_hf, save_hf):
    hf = tiny_hf(case)
    path = save_hf(hf)
    assert_logits_match(hf, path, case)


def test_sliding_window_changes_the_result(tiny_hf, save_hf):
    """Guards the sliding-window case above against a window too wide to matter."""
    hf = tiny_hf("mixtral_sliding")
    model = moetrain.from_pretrained(save_hf(hf))
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        windowed = model(ids).logits
        model.config.sliding_window = None
        full = model(ids).logits
    assert (windowed[0, 4:] - full[0, 4:]).abs().max() > 1e-3
    torch.testing.assert_close(windowed[0, :4], full[0, :4])


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_export_round_trip_loads_in_transformers(case, tiny_hf, save_hf, tmp_path):
    assert_export_round_trip(tiny_hf(case), save_hf, tmp_path / "export")


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "olmoe"])
def test_switch_aux_loss_per_layer_matches_transformers(case, tiny_hf, save_hf):
    """moetrain averages per-layer losses (transformers pools the layers' statistics), so compare layer by layer:
    each layer's unweighted loss must equal ``load_balancing_loss_func`` on that layer's router logits alone."""
    hf = tiny_hf(case)
    model = moetrain.from_pretrained(save_hf(hf))
    cfg = model.config
    layer_weight = cfg.aux_loss_coef / len(cfg.moe_layers)
    ids, masks = padded_batch()
    for mask in masks.values():
        with torch.no_grad():
            ref_logits = hf(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
            out = model(ids, attention_mask=mask)
        assert len(ref_logits) == len(out.layer_aux_losses) == len(cfg.moe_layers)
        for ours, logits in zip(out.layer_aux_losses, ref_logits, strict=True):
            ref = load_balancing_loss_func((logits,), cfg.num_experts, cfg.num_experts_per_tok, mask)
            torch.testing.assert_close(ours / layer_weight, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.aux_loss, torch.stack(out.layer_aux_losses).sum())


def test_aux_loss_mask_is_not_a_no_op(tiny_hf):
    """Guards the masked comparison above: with padding, the reference differs from the unmasked loss."""
    hf = tiny_hf("mixtral")
    ids, masks = padded_batch()
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=masks["left"], output_router_logits=True).router_logits[0]
    masked = load_balancing_loss_func((logits,), 4, 2, masks["left"])
    unmasked = load_balancing_loss_func((logits,), 4, 2, None)
    assert (masked - unmasked).abs() > 1e-4
