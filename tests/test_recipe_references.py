"""What the shipped YAML files' comments point a reader to exists in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
YAML_FILES = sorted([*REPO.glob("recipes/**/*.yaml"), *REPO.glob("configs/**/*.yaml")])
# a document (NAME.md) or a repository path (recipes/..., configs/..., scripts/..., data/examples|tiny/...)
REFERENCE = re.compile(r"[\w./-]+\.md\b|\b(?:recipes|configs|scripts|data/examples|data/tiny)/[\w./-]*\w")


def comment_references(path: Path) -> list[str]:
    refs = []
    for line in path.read_text().splitlines():
        if "#" in line:
            refs += REFERENCE.findall(line[line.index("#"):])
    return refs


@pytest.mark.parametrize("path", YAML_FILES, ids=[str(p.relative_to(REPO)) for p in YAML_FILES])
def test_comments_name_files_that_exist(path):
    missing = [ref for ref in comment_references(path) if not (REPO / ref).exists()]
    assert not missing, f"{path.relative_to(REPO)} comments name {missing}, which are not in the repository"


def test_the_references_are_found():
    assert "configs/models/tiny-deepseek-moe.yaml" in comment_references(REPO / "recipes" / "tiny.yaml")
