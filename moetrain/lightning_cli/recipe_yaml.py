"""YAML as recipes mean it: only ``true`` and ``false`` are booleans; ``yes``, ``no``, ``on`` and ``off`` stay words.

PyYAML follows YAML 1.1, where a bare ``no`` is ``False``; a recipe's ``resident_weights: no`` (a choice of
``yes``/``no``) would then reach the typed settings as a boolean and be refused. The ``fit``/``validate`` parser reads
recipes and command-line values with :func:`load` instead (jsonargparse's own loader otherwise: its float rules).
"""

from __future__ import annotations

import re
from typing import Any

MODE = "moetrain_yaml"
BOOL_TAG = "tag:yaml.org,2002:bool"
_loader: Any = None


def _recipe_loader() -> Any:
    global _loader
    if _loader is None:
        import yaml

        try:  # jsonargparse's loader (floats such as 1e-5 without a dot), when its layout is the known one
            from jsonargparse._loaders_dumpers import get_yaml_default_loader
            base = get_yaml_default_loader()
        except ImportError:
            base = yaml.SafeLoader

        class RecipeLoader(base):  # type: ignore[misc, valid-type]
            yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != BOOL_TAG]
                                       for first, resolvers in base.yaml_implicit_resolvers.items()}

        RecipeLoader.add_implicit_resolver(BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                           list("tTfF"))
        _loader = RecipeLoader
    return _loader


def load(stream: str) -> Any:
    """A recipe or a command-line value, as jsonargparse's ``yaml`` mode loads it but for the booleans."""
    import yaml

    value = yaml.load(stream, Loader=_recipe_loader())  # noqa: S506 (a SafeLoader)
    if isinstance(value, dict) and value and all(v is None for v in value.values()):
        # jsonargparse's rule: "key:" or "{a, b}" on the command line is the string, not a mapping of nulls
        keys = set(stream.strip(" {}").replace(" ", "").split(","))
        if (len(value) == 1 and stream.strip() == next(iter(value)) + ":") or keys == set(value):
            value = stream
    return value


def register() -> str:
    """Make :func:`load` jsonargparse's loader of parser mode :data:`MODE` (idempotent); returns the mode."""
    import yaml
    from jsonargparse import set_loader

    set_loader(MODE, load, exceptions=(yaml.YAMLError,))
    return MODE
