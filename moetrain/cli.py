"""The ``moetrain`` command: ``fit``, ``validate``, ``plan``, ``export``, ``bench``.

``fit`` and ``validate`` are a :class:`~lightning.pytorch.cli.LightningCLI`: a recipe YAML
(``--config recipes/NAME.yaml``) plus dotted overrides (``--trainer.max_steps=20``), checked against
the signatures of :class:`~moetrain.training.module.MoETrainingModule` (``model:``),
:class:`~moetrain.training.data.TextDataModule` (``data:``), the Trainer (``trainer:``),
:class:`~moetrain.training.checkpoint_callback.CheckpointCallback` (``checkpoint:``) and
:class:`~moetrain.training.callbacks.MetricsLogger` (``metrics:``).

``moetrain fit --help`` lists moetrain's sections (``model``, ``model.optimizer``, ``model.offload``, ``data``,
``checkpoint``, ``metrics``, ``progress``, ``profile``, ``parallel``) with every key described (the attribute
docstrings of the section dataclasses), then the Trainer keys that recipes set; ``--help=all`` adds every
Lightning Trainer option.

Bad input (a malformed recipe, an unknown key, a missing file, a broken data line) ends with one
paragraph naming the file, line or key and what to do, exit status 2, and no traceback.

This module dispatches: ``fit`` and ``validate`` live in :mod:`moetrain.lightning_cli` (errors, help, the
LightningCLI subclass, running it); every other subcommand is a tool in :data:`TOOLS`, a function that takes the
arguments and returns an exit status.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Optional

from moetrain import cuda_alloc
from moetrain.lightning_cli.errors import EXIT_BAD_INPUT, PROG, InputError, check_recipe_file, fail
from moetrain.lightning_cli.help import shape_help
from moetrain.lightning_cli.run import parse_config, print_help, resume_command, run_lightning

__all__ = ["EXIT_BAD_INPUT", "PROG", "TOOLS", "USAGE", "InputError", "check_recipe_file", "main", "parse_config",
           "print_help", "resume_command", "run_lightning", "run_tool", "shape_help"]

TOOLS = {
    # subcommand: (module, function taking argv and returning an exit status)
    "plan": ("moetrain.offload.plan", "main"),
    "export": ("moetrain.models.hf_export", "export_main"),
    "bench": ("moetrain.bench", "main"),
    "generate": ("moetrain.generate", "main"),
    "build-ops": ("moetrain.offload.ops", "main"),
    "select-experts": ("moetrain.select_experts", "main"),
    "prune": ("moetrain.prune", "main"),
}


def run_tool(name: str, argv: list[str]) -> int:
    module_name, func_name = TOOLS[name]
    func: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(argv) or 0)
    except SystemExit as stop:  # argparse's --help and usage errors; main() returns the status instead
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(f"{PROG} {name}: error: {stop.code}", file=sys.stderr)
        return 1


USAGE = f"""usage: {PROG} {{fit,validate,plan,export,bench,generate,select-experts,prune,build-ops}} ...

  fit       train a model from a recipe: {PROG} fit --config recipes/tiny.yaml [--key.sub=value ...]
  validate  evaluate a model on a recipe's validation data
  plan      print the memory plan of a recipe on this machine
  export    write a checkpoint as a Hugging Face model directory
  bench     run a benchmark: {PROG} bench --help lists them (link, offload_step, checkpoint_io, ...)
  generate  continue a prompt with a checkpoint: {PROG} generate --ckpt runs/tiny --prompt "Once"
            (--expert_weights paged: routed experts in host memory, only the routed ones paged in)
  select-experts  choose the routed experts a task uses (ESFT): routing statistics over the data, the experts
            covering --top_p of the score per layer, a selection file for model.train.routed_experts
  prune     remove the experts a task routes least: --ckpt DIR --data FILE (--keep N | --coverage P) --out DIR
  build-ops compile DeepSpeed's ops for this environment now (offload runs otherwise compile them on first use)

'{PROG} SUBCOMMAND --help' lists a subcommand's options; '{PROG} fit --help=all' adds every Lightning
Trainer option.
"""


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``moetrain`` console script; returns the exit status."""
    cuda_alloc.apply_defaults()  # before anything touches the GPU: the allocator reads its settings once
    from_sys_argv = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else EXIT_BAD_INPUT
    if argv[0] in TOOLS:
        try:
            return run_tool(argv[0], argv[1:])
        except InputError as err:
            return fail(str(err))
    if argv[0] not in ("fit", "validate"):
        return fail(f"unknown subcommand {argv[0]!r}; choose one of fit, validate, plan, export, bench, generate, "
                    "select-experts, prune, build-ops")
    if any(arg in ("-h", "--help", "--help=all") for arg in argv[1:]):
        try:
            return print_help(argv)
        except InputError as err:
            return fail(str(err))
    try:
        return run_lightning(argv, from_sys_argv)
    except InputError as err:
        return fail(str(err))


if __name__ == "__main__":
    sys.exit(main())
