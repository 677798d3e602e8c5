"""Every shipped YAML is loaded: model presets into ModelConfig, recipes as YAML (their schema is checked with the
training code). The five published presets must have the published parameter totals, and their shapes must
survive the trip through each family's config.json."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
import yaml

from moetrain.config import ConfigError, ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf_configs import config_from_hf, config_to_hf

ROOT = Path(__file__).resolve().parent.parent
CONFIG_YAMLS = sorted((ROOT / "configs").rglob("*.y*ml"))
RECIPE_YAMLS = sorted((ROOT / "recipes").rglob("*.y*ml"))
PRESETS = sorted(p.stem for p in (ROOT / "configs" / "models").glob("*.yaml"))

# Totals as the model cards state them (billions, rounded to 0.1 B).
PUBLISHED_TOTALS = {
    "deepseek-moe-16b": 16.4,
    "qwen3-30b-a3b": 30.5,
    "qwen2-moe-a2.7b": 14.3,
    "mixtral-8x7b": 46.7,
    "olmoe-1b-7b": 6.9,
}
HF_CLASSES = {
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
}


def test_the_globs_find_the_presets():
    assert {"deepseek-moe-16b", "tiny-deepseek-moe"} <= set(PRESETS)
    assert len(CONFIG_YAMLS) >= len(PRESETS)


@pytest.mark.parametrize("path", CONFIG_YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_yaml_loads_into_model_config(path):
    cfg = ModelConfig.from_preset(path)
    assert cfg.param_counts()["total"] > 0


@pytest.mark.parametrize("path", RECIPE_YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_yaml_parses(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: a recipe is a YAML mapping"


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_published_parameter_totals(name):
    total = ModelConfig.from_preset(name).param_counts()["total"] / 1e9
    assert abs(total - PUBLISHED_TOTALS[name]) <= 0.05 + 1e-9, f"{name}: {total:.3f} B"


@pytest.mark.parametrize("name", [n for n in sorted(PUBLISHED_TOTALS) if n != "deepseek-moe-16b"])
def test_param_counts_equal_transformers(name):
    """The same shape built by transformers (on the meta device: no memory) has the same parameter count."""
    cfg = ModelConfig.from_preset(name)
    config_cls, model_cls = HF_CLASSES[cfg.family]
    with torch.device("meta"):
        hf = model_cls(config_cls(**config_to_hf(cfg)))
    assert sum(p.numel() for p in hf.parameters()) == cfg.param_counts()["total"]


@pytest.mark.parametrize("name", [p for p in PRESETS if p.startswith("tiny-")])
def test_param_counts_equal_the_built_model(name):
    cfg = ModelConfig.from_preset(name)
    model = MoEForCausalLM(cfg)
    counts = cfg.param_counts()
    assert model.num_parameters() == counts["total"]
    expert_names = model.expert_parameter_names()
    assert sum(p.numel() for n, p in model.named_parameters() if n in expert_names) == counts["expert"]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_survives_config_json(name):
    cfg = ModelConfig.from_preset(name)
    assert config_from_hf(config_to_hf(cfg), name=cfg.name) == cfg


def test_unknown_preset_and_key_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no-such-model.*available: .*deepseek-moe-16b"):
        ModelConfig.from_preset("no-such-model")
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: mixtral\nhiden_size: 64\n")
    with pytest.raises(ConfigError, match="hiden_size"):
        ModelConfig.from_preset(bad)
