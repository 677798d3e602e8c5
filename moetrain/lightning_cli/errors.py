"""What the ``fit`` and ``validate`` commands say about bad input: one paragraph that names the file, line or key
and what to do, exit status 2, and no traceback. Lightning's and jsonargparse's own messages (nested, multi-line,
often without the key) are turned into such a paragraph here."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

PROG = "moetrain"
EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Bad user input found by the CLI itself (the message is the whole explanation)."""


def fail(message: str) -> int:
    """Print one paragraph to stderr and return the bad-input exit status."""
    text = " ".join(str(message).split())
    # no breaks inside paths or keys (they stay copy-pastable)
    print(textwrap.fill(f"{PROG}: error: {text}", width=100, break_on_hyphens=False, break_long_words=False),
          file=sys.stderr)
    return EXIT_BAD_INPUT


def config_paths(argv: list[str]) -> list[str]:
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def check_recipe_file(path: str) -> None:
    """Fail early, with the file and line, on a missing or syntactically broken recipe.

    jsonargparse reports YAML problems without the line; checking here gives the user the place.
    """
    import yaml

    recipe = Path(path)
    if not recipe.is_file():
        raise InputError(f"recipe file {path} not found; pass an existing YAML file to --config "
                         "(the shipped ones are under recipes/)")
    try:
        data = yaml.safe_load(recipe.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else path
        problem = getattr(err, "problem", None) or str(err)
        raise InputError(f"{where}: the recipe is not valid YAML ({problem}); fix the syntax there "
                         "(indentation and 'key: value' pairs)") from None
    if data is not None and not isinstance(data, dict):
        raise InputError(f"{path}: a recipe must be a YAML mapping of sections (trainer:, model:, data:, ...), "
                         f"got a {type(data).__name__}")


def check_input(argv: list[str]) -> None:
    """Before parsing: every recipe file is readable YAML (:func:`check_recipe_file`), and neither a recipe nor a
    command-line argument uses a key of the old flat ``model.offload`` section (or a value that is gone): such a
    key fails here, naming the key that replaced it, instead of as an unknown key."""
    for path in config_paths(argv):
        check_recipe_file(path)
    from moetrain.offload.config import moved_key_message

    for path in config_paths(argv):
        import yaml

        model = (yaml.safe_load(Path(path).read_text()) or {}).get("model")
        offload = model.get("offload") if isinstance(model, dict) else None
        if isinstance(offload, dict) and (moved := moved_key_message(offload)):
            raise InputError(f"{path}: {moved}")
    prefix = "--model.offload."
    for i, arg in enumerate(argv):
        if not arg.startswith(prefix):
            continue
        key, eq, value = arg[len(prefix):].partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        group, _, inner = key.partition(".")
        moved = moved_key_message({group: {inner: value}} if inner else {group: value})
        if moved:
            raise InputError(moved)


def _choice_message(text: str) -> Optional[str]:
    """jsonargparse's refusal of a value outside a ``Literal`` as ``key='value': choose one of a, b, c``."""
    match = re.search(r'Parser key "([\w.]+)":\s*Expected a typing\.Literal\[(.*?)\]\. Got value: (.*)', text)
    if match is None:
        return None
    choices = ", ".join(c.strip().strip("'\"") for c in match.group(2).split(","))
    return f"{match.group(1)}={match.group(3).strip()!r}: choose one of {choices}"


def parser_error_message(err: BaseException, argv: list[str]) -> str:
    """Turn jsonargparse's (often nested, multi-line) message into one paragraph naming key and file."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    recipes = config_paths(argv)
    source = f" in {', '.join(recipes)} or the command line" if recipes else ""
    choice = _choice_message(" ".join(lines))
    if choice is not None:
        return f"invalid configuration{source}: {choice}. Fix that key in the recipe or on the command line."
    # the innermost reasons are the most specific; keep the first line and the distinct last ones
    keep = lines[:1] + [ln for ln in lines[1:] if "Given value type" not in ln][-3:]
    detail = " ".join(keep) if keep else type(err).__name__
    return (f"invalid configuration{source}: {detail}. Check the key's spelling and type against "
            f"'{PROG} fit --help' (a recipe's sections are trainer, model, data, checkpoint, metrics).")


def instantiation_error_message(err: BaseException) -> str:
    """The user-facing reason inside jsonargparse's "Does not validate against any of the Union subtypes"."""
    reasons = []
    for cause in (err.__cause__, err):
        if cause is None:
            continue
        for line in str(cause).splitlines():
            line = line.strip().removeprefix("- ").strip()
            if line and not line.startswith(("Expected a <class 'NoneType'>", "Given value", "Subtypes:", "Errors:",
                                             "Does not validate")):
                reasons.append(line)
    reason = "; ".join(dict.fromkeys(reasons)) or str(err)
    return f"invalid configuration: {reason}. Fix that key in the recipe or on the command line."


def trainer_key(message: str, trainer: dict[str, Any]) -> Optional[str]:
    """The ``trainer.<key>`` a Lightning error is about: the first key it quotes (`key` or key=...), else the
    first key it names as a word (messages also mention other keys, e.g. devices "using cpu accelerator")."""
    def first(pattern: str) -> Optional[str]:
        found = [(m.start(), key) for key in trainer if (m := re.search(pattern.format(re.escape(key)), message))]
        return min(found)[1] if found else None

    named = first(r"`{0}`|(?<![A-Za-z0-9_]){0}=") or first(r"(?<![A-Za-z0-9_]){0}(?![A-Za-z0-9_])")
    if named:
        return named
    # a missing optional package names the package, not the key: find the setting that asked for it
    flat = message.lower().replace("_", "-")
    for key in ("precision", "strategy", "accelerator", "plugins"):
        value = trainer.get(key)
        if isinstance(value, str) and value.lower().replace("_", "-").split("-")[0] in flat:
            return key
    return None


def trainer_error_message(err: BaseException, trainer: dict[str, Any]) -> str:
    """One paragraph for a value that the Lightning Trainer itself refused, naming ``trainer.<key>``."""
    reason = " ".join(str(err).split()).rstrip(".") or type(err).__name__
    key = trainer_key(reason, trainer)
    if isinstance(err, ImportError):
        what = f"trainer.{key}={trainer.get(key)!r}" if key else "a trainer setting"
        return (f"{what} needs a package that is not installed ({reason}). Install it, or choose another "
                f"value{f' for trainer.{key}' if key else ''} in the recipe or on the command line.")
    if key is None:
        return (f"the Lightning Trainer refused the trainer section: {reason}. Fix that value in the recipe or on "
                f"the command line (see '{PROG} fit --help' for the trainer keys).")
    return (f"trainer.{key}={trainer.get(key)!r} is not accepted by Lightning: {reason}. Set trainer.{key} to a "
            f"valid value in the recipe or on the command line (see '{PROG} fit --help').")
