"""Rewrite the memory plan quoted in each recipe's header with what ``moetrain plan`` prints now.

A real recipe's header quotes the plan of its target machine (the ``moetrain plan --config recipes/NAME.yaml
--gpu-gb=... --host-gb=... --disk-gb=...`` line in the header) from its ``offload tier:`` line (or the ``note:``
line above it) to its ``largest preset`` line; ``tests/test_recipes_run.py`` fails when the two differ. After a
change to the planner, run this and review the diff:

    python scripts/update_recipe_plans.py            # every recipe with a plan block
    python scripts/update_recipe_plans.py qwen3-30b-a3b
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLAN_COMMAND = re.compile(r"^#\s+moetrain plan (--config recipes/[\w.-]+\.yaml[^#]*?)\s*$")


def plan_output(args: list[str]) -> list[str]:
    from moetrain.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["plan", *args])
    if status != 0:
        raise SystemExit(f"moetrain plan {' '.join(args)} exited {status}")
    return out.getvalue().splitlines()


def block_bounds(lines: list[str]) -> tuple[int, int] | None:
    """(first, last) index of the plan block among ``lines`` (uncommented text), or None."""
    starts = [i for i, line in enumerate(lines) if line.startswith("offload tier:")]
    ends = [i for i, line in enumerate(lines) if line.startswith("largest preset")]
    if not starts or not ends:
        return None
    start = starts[0] - 1 if starts[0] > 0 and lines[starts[0] - 1].startswith("note: ") else starts[0]
    return start, ends[0]


def update(recipe: Path) -> bool:
    """Rewrite ``recipe``'s header plan block; True when it changed."""
    text = recipe.read_text().splitlines()
    header_end = next((i for i, line in enumerate(text) if not line.startswith("#")), len(text))
    header = text[:header_end]
    commands = [m.group(1).split() for line in header if (m := PLAN_COMMAND.match(line))]
    plain = [line[2:] if line.startswith("# ") else line[1:] for line in header]
    old = block_bounds(plain)
    if not commands or old is None:
        return False
    printed = plan_output(commands[0])
    new = block_bounds(printed)
    if new is None:
        raise SystemExit(f"{recipe}: moetrain plan printed no plan block")
    block = [("# " + line).rstrip() if line else "#" for line in printed[new[0]:new[1] + 1]]
    rewritten = header[:old[0]] + block + header[old[1] + 1:] + text[header_end:]
    if rewritten == text:
        return False
    recipe.write_text("\n".join(rewritten) + "\n")
    return True


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    import os

    os.chdir(REPO)
    for name in names:
        recipe = REPO / "recipes" / f"{name}.yaml"
        print(f"{recipe.relative_to(REPO)}: {'updated' if update(recipe) else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
