"""Running ``fit`` and ``validate``: parse, check, build, train or score, and report a stop; the help; and a
parse-only entry for tests and notebooks."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from moetrain.lightning_cli import recipe_yaml
from moetrain.lightning_cli.app import build_cli_class
from moetrain.lightning_cli.errors import PROG, InputError, check_input, fail, parser_error_message


def parser_kwargs() -> dict[str, Any]:
    """The fit/validate parser's settings: moetrain's name, errors raised (not exit), recipes read as YAML whose only
    booleans are true and false (:mod:`~moetrain.lightning_cli.recipe_yaml`)."""
    return {"prog": PROG, "exit_on_error": False, "parser_mode": recipe_yaml.register()}


def resume_command(argv: list[str], then: str = "--ckpt_path=last") -> str:
    """The command that resumes the run of ``argv`` (``fit ...``): the same arguments with ``--ckpt_path=last``
    instead of any ``--ckpt_path`` (and without ``--overwrite_run``, which would delete what it resumes).
    ``then``: another last argument (``--overwrite_run=true``: start the run again)."""
    import shlex

    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--ckpt_path", "--overwrite_run"):
            skip = True
        elif not arg.startswith(("--ckpt_path=", "--overwrite_run=")):
            kept.append(arg)
    return shlex.join([PROG, *kept, then])


def _report_stop(cli: Any, argv: list[str]) -> None:
    """After SIGTERM/Ctrl-C stopped ``fit``: say so, which checkpoint holds the run, and how to resume."""
    from moetrain.models.hf import CHECKPOINTS_DIR, LAST_FILE
    from moetrain.training import signals
    from moetrain.training.checkpoint_callback import CheckpointCallback
    from moetrain.training.run_dir import OVERWRITE_FLAG

    signum = signals.requested()
    trainer = getattr(cli, "trainer", None)
    if signum is None or trainer is None or not trainer.is_global_zero or argv[:1] != ["fit"]:
        return
    if getattr(cli, "stopped_at_once", False):
        last = Path(trainer.default_root_dir) / CHECKPOINTS_DIR / LAST_FILE
        newest = last.parent / last.read_text().strip() if last.is_file() else None
        command = resume_command(argv) if newest is not None else resume_command(argv, then=OVERWRITE_FLAG)
        print(signals.forced_stop_message(signum, newest, command), file=sys.stderr)
        return
    saved = next((cb.saved_path for cb in trainer.callbacks if isinstance(cb, CheckpointCallback)), None)
    print(signals.stop_message(signum, trainer.global_step, saved=saved, resume=resume_command(argv)), file=sys.stderr)


def print_help(argv: list[str]) -> int:
    """``moetrain fit|validate [--config RECIPE] --help`` (or ``--help=all``): print the help and return 0.

    A recipe given before ``--help`` shows its values as the defaults.
    """
    import jsonargparse

    from moetrain.training.data import TextDataModule
    from moetrain.training.module import MoETrainingModule

    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    full = "--help=all" in argv
    argv = ["--help" if arg == "--help=all" else arg for arg in argv]
    check_input(argv)
    cli_class = build_cli_class()
    cli_class.help_mode = "all" if full else "brief"
    # the section dataclasses describe their fields in attribute docstrings; parsing them costs about a second,
    # so only the help does it
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        cli_class(MoETrainingModule, TextDataModule, args=argv, seed_everything_default=0,
                  auto_configure_optimizers=False, parser_kwargs=parser_kwargs())
    except SystemExit as done:
        return int(done.code or 0)
    finally:
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=False)
    return 0


class _ParsedOnly(Exception):
    def __init__(self, config: Any) -> None:
        super().__init__("parsed")
        self.config = config


def parse_config(argv: list[str]) -> Any:
    """Parse and type-check ``fit``/``validate`` arguments (a recipe and overrides) without building anything.

    Returns the subcommand's jsonargparse Namespace. Raises ``jsonargparse.ArgumentError`` on bad input.
    """

    class ParseOnly(build_cli_class()):
        def before_instantiate_classes(self) -> None:
            raise _ParsedOnly(self.config[self.subcommand])

    from moetrain.training.data import TextDataModule
    from moetrain.training.module import MoETrainingModule

    check_input(argv)
    try:
        ParseOnly(MoETrainingModule, TextDataModule, args=argv, seed_everything_default=0,
                  auto_configure_optimizers=False, parser_kwargs=parser_kwargs())
    except _ParsedOnly as parsed:
        return parsed.config
    raise AssertionError("unreachable: LightningCLI returned before instantiating classes")


def _quiet_lightning() -> None:
    # Lightning's start-up banners (GPU available, TPU cores, ...) say nothing a recipe user needs
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_lightning(argv: list[str], from_sys_argv: bool = False) -> int:
    from jsonargparse import ArgumentError

    from moetrain.config import ConfigError
    from moetrain.shards import ShardError
    from moetrain.training.data import DataError, TextDataModule
    from moetrain.training.module import MoETrainingModule

    check_input(argv)
    _quiet_lightning()
    # Lightning's own use of a deprecated torch pytree check warns on every run; it is not actionable here
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # main(argv) called from Python (tests, notebooks) while sys.argv holds the host program's arguments
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    cli_class = build_cli_class()
    from moetrain.training import signals

    signals.clear()
    try:
        cli = cli_class(
            MoETrainingModule, TextDataModule, args=None if from_sys_argv else argv, seed_everything_default=0,
            auto_configure_optimizers=False,
            parser_kwargs=parser_kwargs(),
            save_config_kwargs={"overwrite": True},
        )
    except ArgumentError as err:
        return fail(parser_error_message(err, argv))
    except (ConfigError, DataError, ShardError, InputError) as err:
        return fail(str(err))
    except (RuntimeError, OSError, MemoryError) as err:
        from moetrain.preflight import resource_error_message

        message = resource_error_message(err)  # out of GPU, host or pinned memory, or disk: the settings to change
        if message is None:
            raise
        return fail(message)
    _report_stop(cli, argv)
    return signals.exit_status()  # 128 + signal when SIGTERM/Ctrl-C stopped training (after its checkpoint)
