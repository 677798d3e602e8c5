"""Every recipe under recipes/ (recursively) parses against the CLI's typed signatures and points at real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from moetrain.cli import parse_config
from moetrain.config import ModelConfig
from moetrain.training.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml")) + sorted((REPO / "recipes").rglob("*.yml"))


def test_there_are_recipes():
    assert REPO / "recipes" / "tiny.yaml" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_parses_and_its_files_exist(recipe, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name data relative to the repository root, where the README runs them
    config = parse_config(["fit", "--config", str(recipe)])
    model = config.model
    lines = recipe.read_text().splitlines()
    assert lines[0].startswith("#") and any("moetrain fit --config" in ln for ln in lines[:10]), \
        f"{recipe}: start with a comment header giving the launch command and the hardware"
    if model.init_from is not None:
        return  # fine-tunes a downloaded model on the user's data: those files live outside the repository
    # a self-contained recipe: everything it names ships with the repository
    model_config = ModelConfig.from_preset(model.preset, **(model.config or {}))
    data = config.data
    assert Path(data.path).is_file(), f"{recipe}: data.path {data.path} does not exist"
    if data.val_path is not None:
        assert Path(data.val_path).is_file(), f"{recipe}: data.val_path {data.val_path} does not exist"
    tokenizer = load_tokenizer(data.tokenizer)
    assert tokenizer.vocab_size <= model_config.vocab_size, f"{recipe}: tokenizer larger than the model's vocab"
