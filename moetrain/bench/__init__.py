"""Benchmarks: ``moetrain bench NAME [options]`` runs one; each prints one ``RESULT {json}`` line and writes its
JSON file under ``--out``.

A benchmark is a module of this package with a ``main(argv)`` (``python -m moetrain.bench.NAME`` runs the same
function); ``moetrain bench --help`` lists them with the first sentence of their docstrings.
``scripts/gpu_bench.sh`` runs them all on a GPU machine. Modules without ``main`` are helpers
(``stream_overlap`` is ``offload_step --profile``'s trace summary).
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
import textwrap
from pathlib import Path
from typing import Optional

PROG = "moetrain bench"
NEEDS_CUDA = frozenset({"link", "expert_compute", "offload_step", "multi_gpu", "fused_step"})
"""Benchmarks that measure a CUDA GPU and cannot run without one (``checkpoint_io`` runs on the CPU too)."""


def benchmarks() -> dict[str, str]:
    """Name -> the first sentence of its docstring, for every module here with a top-level ``main``.

    Read from the source, without importing the modules (they import torch and the model code).
    """
    found = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            doc = " ".join((ast.get_docstring(tree) or "").split("\n\n")[0].split())  # the first paragraph
            cut = re.search(r"(?<=[A-Za-z0-9)`])\. ", doc)
            found[path.stem] = (doc[: cut.start() + 1] if cut else doc).replace("``", "")
    return found


def usage() -> str:
    found = benchmarks()
    width = max(map(len, found), default=0)
    rows = []
    for name, what in found.items():
        text = what + (" Needs a CUDA GPU." if name in NEEDS_CUDA else "")
        rows.append(textwrap.fill(text, width=100, initial_indent=f"  {name:<{width}}  ",
                                  subsequent_indent=" " * (width + 4)))
    return (f"usage: {PROG} {{{','.join(found)}}} [options]\n\n" + "\n".join(rows) + "\n\n"
            f"'{PROG} NAME --help' lists a benchmark's options; 'bash scripts/gpu_bench.sh' runs them all on a GPU "
            "machine.")


def main(argv: Optional[list[str]] = None) -> int:
    """``moetrain bench NAME [options]``: run one benchmark; returns the exit status (2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, args = argv[0], argv[1:]
    found = benchmarks()
    if name not in found:
        print(f"{PROG}: error: unknown benchmark {name!r}; choose one of {', '.join(found)}", file=sys.stderr)
        return 2
    if name in NEEDS_CUDA and not any(arg in ("-h", "--help") for arg in args):
        import torch

        if not torch.cuda.is_available():
            print(f"{PROG}: error: {name} measures a CUDA GPU and none is visible here; run it on a GPU machine",
                  file=sys.stderr)
            return 2
    module = importlib.import_module(f"{__name__}.{name}")
    program = sys.argv[0]
    sys.argv[0] = f"{PROG} {name}"  # argparse names the program after argv[0]: its help shows this command
    try:
        result = module.main(args)
    except SystemExit as stop:  # argparse (--help, a bad option) and the benchmarks' own refusals
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(f"{PROG} {name}: error: {stop.code}", file=sys.stderr)
        return 1
    finally:
        sys.argv[0] = program
    return result if isinstance(result, int) else 0
