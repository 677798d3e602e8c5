"""Shared fixtures: deterministic seeds and tiny random Hugging Face models saved as sharded checkpoints."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _randomize(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Re-draw every parameter so that no test passes on an initialisation symmetry: matrices N(0, std),
    vectors (norm weights, biases) 1 + N(0, std) or N(0, std). Routers get decisive, untied logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            elif "norm" in name:
                p.copy_(1.0 + std * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model


@pytest.fixture
def randomize():
    """``randomize(model, std=0.1)``: re-draw all parameters in place; returns the model."""
    return _randomize


@pytest.fixture
def save_hf(tmp_path):
    """``save_hf(hf_model, name)``: save_pretrained into tmp_path/name in ~100 KB shards; returns the path."""

    def _save(hf_model, name: str = "hf", max_shard_size: str = "100KB"):
        out = tmp_path / name
        hf_model.save_pretrained(out, max_shard_size=max_shard_size)
        return out

    return _save
