"""The ``moetrain`` command: ``fit``, ``validate``, ``plan``, ``export``, ``bench``.

``fit`` and ``validate`` are a :class:`~lightning.pytorch.cli.LightningCLI`: a recipe YAML
(``--config recipes/NAME.yaml``) plus dotted overrides (``--trainer.max_steps=20``), checked against
the signatures of :class:`~moetrain.training.module.MoETrainingModule` (``model:``),
:class:`~moetrain.training.data.TextDataModule` (``data:``), the Trainer (``trainer:``),
:class:`~moetrain.training.checkpoint_callback.CheckpointCallback` (``checkpoint:``) and
:class:`~moetrain.training.callbacks.MetricsLogger` (``metrics:``).

``moetrain fit --help`` lists moetrain's sections (``model``, ``model.optimizer``, ``model.offload``, ``data``,
``checkpoint``, ``metrics``, ``progress``, ``parallel``) with every key described (the attribute docstrings of the
section dataclasses), then the Trainer keys that recipes set; ``--help=all`` adds every Lightning Trainer option.

Bad input (a malformed recipe, an unknown key, a missing file, a broken data line) ends with one
paragraph naming the file, line or key and what to do, exit status 2, and no traceback.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

PROG = "moetrain"
TOOLS = {
    # subcommand: (module, function taking argv and returning an exit status)
    "plan": ("moetrain.offload.plan", "main"),
    "export": ("moetrain.models.hf", "export_main"),
    "bench": ("moetrain.bench", "main"),
    "generate": ("moetrain.generate", "main"),
    "build-ops": ("moetrain.offload.ops", "main"),
}
EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Bad user input found by the CLI itself (the message is the whole explanation)."""


def _fail(message: str) -> int:
    """Print one paragraph to stderr and return the bad-input exit status."""
    text = " ".join(str(message).split())
    # no breaks inside paths or keys (they stay copy-pastable)
    print(textwrap.fill(f"{PROG}: error: {text}", width=100, break_on_hyphens=False, break_long_words=False),
          file=sys.stderr)
    return EXIT_BAD_INPUT


# ---------------------------------------------------------------------------------------------- recipe checks
def _config_paths(argv: list[str]) -> list[str]:
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


def _parser_error_message(err: BaseException, argv: list[str]) -> str:
    """Turn jsonargparse's (often nested, multi-line) message into one paragraph naming key and file."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    # the innermost reasons are the most specific; keep the first line and the distinct last ones
    keep = lines[:1] + [ln for ln in lines[1:] if "Given value type" not in ln][-3:]
    detail = " ".join(keep) if keep else type(err).__name__
    recipes = _config_paths(argv)
    source = f" in {', '.join(recipes)} or the command line" if recipes else ""
    return (f"invalid configuration{source}: {detail}. Check the key's spelling and type against "
            f"'{PROG} fit --help' (a recipe's sections are trainer, model, data, checkpoint, metrics).")


def _instantiation_error_message(err: BaseException) -> str:
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


def _trainer_key(message: str, trainer: dict[str, Any]) -> Optional[str]:
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


def _trainer_error_message(err: BaseException, trainer: dict[str, Any]) -> str:
    """One paragraph for a value that the Lightning Trainer itself refused, naming ``trainer.<key>``."""
    reason = " ".join(str(err).split()).rstrip(".") or type(err).__name__
    key = _trainer_key(reason, trainer)
    if isinstance(err, ImportError):
        what = f"trainer.{key}={trainer.get(key)!r}" if key else "a trainer setting"
        return (f"{what} needs a package that is not installed ({reason}). Install it, or choose another "
                f"value{f' for trainer.{key}' if key else ''} in the recipe or on the command line.")
    if key is None:
        return (f"the Lightning Trainer refused the trainer section: {reason}. Fix that value in the recipe or on "
                f"the command line (see '{PROG} fit --help' for the trainer keys).")
    return (f"trainer.{key}={trainer.get(key)!r} is not accepted by Lightning: {reason}. Set trainer.{key} to a "
            f"valid value in the recipe or on the command line (see '{PROG} fit --help').")


# ---------------------------------------------------------------------------------------------- LightningCLI
def _build_cli_class():
    """Import Lightning lazily: ``moetrain plan`` and ``--help`` of the tools should not pay for it."""
    import torch
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from moetrain.config import ConfigError
    from moetrain.models.hf import resolve_checkpoint
    from moetrain.parallel.config import ParallelConfig
    from moetrain.training import signals
    from moetrain.training.callbacks import MetricsLogger
    from moetrain.training.checkpoint_callback import CheckpointCallback
    from moetrain.training.data import DataError
    from moetrain.training.module import MoETrainingModule
    from moetrain.training.progress import StepProgress
    from moetrain.training.run_dir import check_run_dir

    class MoeTrainCLI(LightningCLI):
        """LightningCLI with moetrain's sections, defaults and checkpoint resolution."""

        stopped_at_once = False
        """Whether a second SIGINT stopped ``fit`` mid-step (nothing saved for that step)."""

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                    "validate": {"model", "dataloaders", "datamodule"}}

        prepared_data: Any = None
        """The data module the preflight prepared (:func:`moetrain.preflight.prepare_data`) until it is adopted."""

        help_mode: Optional[str] = None
        """``brief`` or ``all`` while printing ``--help`` (see :func:`print_help`); None otherwise."""

        def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
            parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
            if self.help_mode is not None:
                shape_help(parser, subcommand, full=self.help_mode == "all")
            return parser

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_lightning_class_args(CheckpointCallback, "checkpoint")
            parser.add_lightning_class_args(MetricsLogger, "metrics")
            parser.add_lightning_class_args(StepProgress, "progress")
            parser.add_class_arguments(ParallelConfig, "parallel")
            parser.add_argument(
                "--cpu_threads", type=Optional[int], default=None,
                help="torch intra-op threads (null: torch's default, one per core). Small models run faster on "
                     "one thread, and far faster when other work shares the cores.",
            )
            parser.add_argument(
                "--overwrite_run", type=bool, default=False,
                help="fit into a run directory that already holds a run: delete that run's metrics, logs and "
                     "checkpoints and start again (without it such a fit is refused; --ckpt_path=last resumes).",
            )

        def before_instantiate_classes(self) -> None:
            threads = self.config[self.subcommand].get("cpu_threads")
            if threads is not None:
                if threads < 1:
                    raise InputError(f"cpu_threads must be at least 1, got {threads}")
                torch.set_num_threads(threads)
            trainer = self.config[self.subcommand]["trainer"]
            if trainer.get("precision") is None:
                # bf16 autocast with fp32 master weights on a GPU; plain fp32 on the CPU
                trainer["precision"] = "bf16-mixed" if torch.cuda.is_available() else "32-true"
            if self.subcommand == "validate" and trainer.get("limit_val_batches") == 0:
                trainer["limit_val_batches"] = None  # recipes switch validation off during fit, not here
            if trainer.get("enable_progress_bar") is None:
                # during fit the step bar (progress: section) replaces Lightning's micro-batch bar
                trainer["enable_progress_bar"] = sys.stderr.isatty() and self.subcommand != "fit"
            if trainer.get("accumulate_grad_batches", 1) != 1:
                raise InputError("trainer.accumulate_grad_batches must stay 1: moetrain accumulates inside the "
                                 "module; set model.accumulate_grad_batches instead")
            if self.subcommand == "fit" and _several_ranks(trainer) and trainer.get("strategy") in (None, "auto",
                                                                                              "ddp"):
                from moetrain.parallel.strategy import register

                trainer["strategy"] = register()  # DDP's processes; moetrain.parallel reduces the gradients
            if trainer.get("gradient_clip_val"):
                raise InputError("trainer.gradient_clip_val is not used: set model.optimizer.max_grad_norm instead "
                                 "(the optimizer clips the global norm itself)")
            # every value that can be checked without building the model, before the model is built (minutes)
            from moetrain import preflight

            preflight.check_config(self.config[self.subcommand], self.subcommand)
            try:
                preflight.check_trainer(trainer)
            except (MisconfigurationException, ValueError, TypeError, ImportError) as err:
                if isinstance(err, (ConfigError, DataError)):
                    raise
                raise InputError(_trainer_error_message(err, self._trainer_config())) from None
            # the data last: reading and tokenizing it is the slowest check (and comes before a run is overwritten)
            self.prepared_data = preflight.prepare_data(self.config[self.subcommand]["data"], self.subcommand)
            if self.subcommand == "fit":
                config = self.config["fit"]
                check_run_dir(trainer.get("default_root_dir") or Path.cwd(), resume=config.get("ckpt_path"),
                              overwrite=bool(config.get("overwrite_run")),
                              metrics_file=config["metrics"].get("filename") or "metrics.jsonl",
                              delete=_launched_as_rank_zero())

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, TypeError) as err:
                # a section's constructor refused its values (OffloadConfig and friends validate in
                # __post_init__); jsonargparse wraps that message in its own, so unwrap it
                if isinstance(err, (ConfigError, DataError)):
                    raise
                raise InputError(_instantiation_error_message(err)) from None
            if self.prepared_data is not None:
                self.datamodule.adopt(self.prepared_data)  # the data the preflight prepared: not tokenized again
                self.prepared_data = None

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            try:
                return super().instantiate_trainer(**kwargs)
            except (MisconfigurationException, ValueError, TypeError, ImportError) as err:
                # the Trainer's own checks (max_steps >= -1, limit_*_batches, devices, precision plugins, ...)
                if isinstance(err, (ConfigError, DataError)):
                    raise
                raise InputError(_trainer_error_message(err, self._trainer_config())) from None

        def _trainer_config(self) -> dict[str, Any]:
            trainer = self.config[self.subcommand]["trainer"]
            return dict(trainer.items()) if hasattr(trainer, "items") else dict(vars(trainer))

        def _run_subcommand(self, subcommand: str) -> None:
            try:
                super()._run_subcommand(subcommand)
            finally:
                self.model.release_offload()  # the swap file goes on success, error and Ctrl-C alike

        def _run_checked(self, run: Callable[[], Any]) -> None:
            """Lightning checks some trainer values only when fit/validate starts (e.g. val_check_interval)."""
            try:
                run()
            except MisconfigurationException as err:
                raise InputError(_trainer_error_message(err, self._trainer_config())) from None

        def after_instantiate_classes(self) -> None:
            parser = self._parser(self.subcommand)
            self.model.resolved_recipe = parser.dump(self.config[self.subcommand], skip_none=False)
            if self.subcommand == "fit":
                from moetrain.parallel.runtime import ParallelRuntime

                self.model.parallel = ParallelRuntime(self.config_init[self.subcommand]["parallel"])

        def fit(self, model: MoETrainingModule, datamodule: Any = None, ckpt_path: Optional[str] = None,
                **kwargs: Any) -> None:
            if ckpt_path is not None:
                ckpt = resolve_checkpoint(ckpt_path, self.trainer.default_root_dir)
                model.resume_from(ckpt)
            try:
                self._run_checked(lambda: self.trainer.fit(model, datamodule=datamodule, **kwargs))
            except SystemExit:
                # Lightning's answer to a second Ctrl-C, raised mid-step (KeyboardInterrupt): reported by run_lightning
                if signals.requested() is None:
                    raise
                self.stopped_at_once = True

        def validate(self, model: MoETrainingModule, datamodule: Any = None, ckpt_path: Optional[str] = None,
                     **kwargs: Any) -> None:
            if ckpt_path is not None:
                model.load_weights_from(resolve_checkpoint(ckpt_path, self.trainer.default_root_dir))
            elif self.config["validate"]["model"].get("init_from") is None:
                # the recipe's preset is a random initialisation: its score says nothing about any model
                raise InputError("validate has no weights to score: pass --ckpt_path=RUN_DIR (a run "
                                 "directory, or one of its checkpoints/step-<N>), or --ckpt_path=last with "
                                 "--trainer.default_root_dir=RUN_DIR, or set --model.init_from=HF_DIR to score "
                                 "a Hugging Face model; without one it would score a random initialisation")
            self._run_checked(lambda: self.trainer.validate(model, datamodule=datamodule, **kwargs))

    return MoeTrainCLI


def _several_ranks(trainer: dict) -> bool:
    """Whether the trainer section asks for more than one process (devices as a count or a list, or nodes).

    ``devices: auto`` is several on a machine with several GPUs (Lightning would then pick DDP, whose wrapper
    must not reduce the gradients a second time).
    """
    import torch

    devices = trainer.get("devices")
    if isinstance(devices, (list, tuple)):
        many = len(devices) > 1
    elif devices in (None, "auto"):
        many = trainer.get("accelerator") != "cpu" and torch.cuda.device_count() > 1
    else:
        many = str(devices).lstrip("-").isdigit() and (int(devices) > 1 or int(devices) == -1)
    return many or int(trainer.get("num_nodes") or 1) > 1


def _launched_as_rank_zero() -> bool:
    """Whether this process is (or will be) global rank 0 of its launch, from the launchers' environment
    (torchrun's RANK, Lightning's LOCAL_RANK and NODE_RANK for the processes it starts, SLURM's SLURM_PROCID)."""
    import os

    return all(os.environ.get(key, "0") == "0" for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


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
    print(signals.stop_message(signum, trainer.global_step, saved, resume_command(argv)), file=sys.stderr)


# ---------------------------------------------------------------------------------------------- --help
SECTION_TITLES = {
    "model": "model: the model to fine-tune and how its steps run",
    "model.optimizer": "model.optimizer: AdamW, learning-rate schedule and gradient clipping",
    "model.offload": "model.offload: where the routed experts' optimizer state (and weights) live",
    "data": "data: JSONL training and validation data, tokenizer and packing",
    "checkpoint": "checkpoint: sharded checkpoints under <run directory>/checkpoints/",
    "metrics": "metrics: metrics.jsonl, an experiment logger and expert-load heatmaps",
    "progress": "progress: the bar over optimizer steps",
    "parallel": "parallel: how the ranks of a several-GPU run share the model",
}
TRAINER_COMMON = ("max_steps", "accelerator", "devices", "num_nodes", "strategy", "precision", "default_root_dir",
                  "logger", "val_check_interval", "check_val_every_n_epoch", "limit_val_batches",
                  "num_sanity_val_steps", "enable_progress_bar", "enable_checkpointing", "enable_model_summary")
"""The Trainer keys that recipes set; ``--help`` shows these, ``--help=all`` every Trainer option."""
KEY_HELP = {
    # keys whose help is moetrain's, not Lightning's (moetrain sets or replaces what they do)
    "trainer.max_steps": "optimizer steps to train (each one is model.accumulate_grad_batches micro-batches).",
    "trainer.precision": "null: bf16-mixed on a GPU, 32-true on the CPU; or a Lightning precision such as "
                         "bf16-mixed or 32-true.",
    "trainer.strategy": "auto; with several devices (or nodes) moetrain's DDP strategy is used, whose ranks "
                        "share the experts as the parallel: section says.",
    "trainer.default_root_dir": "the run directory: metrics.jsonl, config.yaml and checkpoints/ are written there.",
    "trainer.logger": "Lightning's logger; recipes set false, since metrics.jsonl and metrics.logger are the logs.",
    "trainer.enable_checkpointing": "Lightning's own .ckpt files; recipes set false, since the checkpoint: "
                                    "section writes sharded checkpoints.",
    "trainer.enable_progress_bar": "Lightning's micro-batch bar; null: off during fit (the progress: bar "
                                   "counts optimizer steps), on in validate when stderr is a terminal.",
    "trainer.accumulate_grad_batches": "must stay 1: set model.accumulate_grad_batches instead.",
    "trainer.gradient_clip_val": "not used: set model.optimizer.max_grad_norm instead.",
    "trainer.log_every_n_steps": "Lightning's logging interval; metrics.jsonl follows model.log_every_n_steps.",
    "checkpoint.async": "true: write checkpoints in a background thread while training goes on; the final and "
                        "the signal save still complete before training returns.",
    "ckpt_path": "resume: last (the run directory's checkpoints/last), a run directory or a "
                 "checkpoints/step-<N> directory; restores the weights, the optimizer state and the step count.",
}
METHOD_TITLES = {"fit": "fit: resuming a run", "validate": "validate: the weights to score"}
VALIDATE_CKPT_HELP = ("the weights to score: last (the run directory's checkpoints/last), a run directory or a "
                      "checkpoints/step-<N> directory.")
DESCRIPTIONS = {
    "fit": "Train a model from a recipe. Every key below is a recipe key (section: then key: value in the YAML) "
           "and a command-line override (--section.key=value, after --config).",
    "validate": "Score a checkpoint on a recipe's validation data (data.val_path or data.val_split). Every key "
                "below is a recipe key and a command-line override (--section.key=value).",
}


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    cut = re.search(r"(?<=[a-z0-9)`])\. ", text)
    return text[: cut.start() + 1] if cut else text


def shape_help(parser: Any, subcommand: str, full: bool = False) -> None:
    """Reorder and word a ``fit``/``validate`` parser's help: moetrain's sections first, every key described,
    then the Trainer (its common keys, or with ``full`` every option). Parsing is unchanged."""
    import argparse

    groups = parser.groups
    trainer_group = groups["trainer"]
    first = [g for g in parser._action_groups if g not in groups.values()]  # positionals and options
    sections = [groups[name] for name in SECTION_TITLES if name in groups]
    method = [g for name, g in groups.items() if name not in SECTION_TITLES and name != "trainer"]
    for name in SECTION_TITLES:
        if name in groups:
            groups[name].title = SECTION_TITLES[name]
    for group in method:
        group.title = METHOD_TITLES.get(subcommand, subcommand)
    for action in parser._actions:
        if isinstance(action.help, str):
            action.help = action.help.replace("``", "")  # reStructuredText quotes of the docstrings
        if action.dest in KEY_HELP:
            action.help = KEY_HELP[action.dest]
        if action.dest == "ckpt_path" and subcommand == "validate":
            action.help = VALIDATE_CKPT_HELP
        if action.dest == "weights_only":
            action.help = argparse.SUPPRESS  # a Lightning .ckpt option; moetrain loads its checkpoints itself
    actions = [a for a in trainer_group._group_actions if not a.dest.endswith(".help")]
    options = len([a for a in actions if a.dest != "trainer"])
    if full:
        trainer_group.title = f"trainer: the Lightning Trainer, all {options} options"
    else:
        keep = [a for a in actions if a.dest.removeprefix("trainer.") in TRAINER_COMMON]
        for action in keep:
            if action.dest not in KEY_HELP:
                action.help = _first_sentence(action.help or "")
        trainer_group._group_actions[:] = keep
        trainer_group.title = (f"trainer: the Lightning Trainer, the keys recipes set ({len(keep)} of {options}; "
                               f"'{PROG} {subcommand} --help=all' lists every option)")
    parser._action_groups[:] = [*first, *sections, *method, trainer_group]
    parser.usage = f"{PROG} {subcommand} [-h | --help=all] [-c RECIPE.yaml] [--section.key=value ...]"
    parser.description = DESCRIPTIONS.get(subcommand, parser.description)


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
    for path in _config_paths(argv):
        check_recipe_file(path)
    cli_class = _build_cli_class()
    cli_class.help_mode = "all" if full else "brief"
    # the section dataclasses describe their fields in attribute docstrings; parsing them costs about a second,
    # so only the help does it
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        cli_class(MoETrainingModule, TextDataModule, args=argv, seed_everything_default=0,
                  auto_configure_optimizers=False, parser_kwargs={"prog": PROG, "exit_on_error": False})
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

    class ParseOnly(_build_cli_class()):
        def before_instantiate_classes(self) -> None:
            raise _ParsedOnly(self.config[self.subcommand])

    from moetrain.training.data import TextDataModule
    from moetrain.training.module import MoETrainingModule

    for path in _config_paths(argv):
        check_recipe_file(path)
    try:
        ParseOnly(MoETrainingModule, TextDataModule, args=argv, seed_everything_default=0,
                  auto_configure_optimizers=False, parser_kwargs={"prog": PROG, "exit_on_error": False})
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

    for path in _config_paths(argv):
        check_recipe_file(path)
    _quiet_lightning()
    # Lightning's own use of a deprecated torch pytree check warns on every run; it is not actionable here
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # main(argv) called from Python (tests, notebooks) while sys.argv holds the host program's arguments
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    cli_class = _build_cli_class()
    from moetrain.training import signals

    signals.clear()
    try:
        cli = cli_class(
            MoETrainingModule, TextDataModule, args=None if from_sys_argv else argv, seed_everything_default=0,
            auto_configure_optimizers=False,
            parser_kwargs={"prog": PROG, "exit_on_error": False},
            save_config_kwargs={"overwrite": True},
        )
    except ArgumentError as err:
        return _fail(_parser_error_message(err, argv))
    except (ConfigError, DataError, ShardError, InputError) as err:
        return _fail(str(err))
    except (RuntimeError, OSError, MemoryError) as err:
        from moetrain.preflight import resource_error_message

        message = resource_error_message(err)  # out of GPU, host or pinned memory, or disk: the settings to change
        if message is None:
            raise
        return _fail(message)
    _report_stop(cli, argv)
    return signals.exit_status()  # 128 + signal when SIGTERM/Ctrl-C stopped training (after its checkpoint)


# ---------------------------------------------------------------------------------------------- tools
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


USAGE = f"""usage: {PROG} {{fit,validate,plan,export,bench,generate,build-ops}} ...

  fit       train a model from a recipe: {PROG} fit --config recipes/tiny.yaml [--key.sub=value ...]
  validate  evaluate a model on a recipe's validation data
  plan      print the memory plan of a recipe on this machine
  export    write a checkpoint as a Hugging Face model directory
  bench     run a benchmark: {PROG} bench --help lists them (link, offload_step, checkpoint_io, ...)
  generate  continue a prompt with a checkpoint: {PROG} generate --ckpt runs/tiny --prompt "Once"
  build-ops compile DeepSpeed's ops for this environment now (offload runs otherwise compile them on first use)

'{PROG} SUBCOMMAND --help' lists a subcommand's options; '{PROG} fit --help=all' adds every Lightning
Trainer option.
"""


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``moetrain`` console script; returns the exit status."""
    from_sys_argv = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else EXIT_BAD_INPUT
    if argv[0] in TOOLS:
        try:
            return run_tool(argv[0], argv[1:])
        except InputError as err:
            return _fail(str(err))
    if argv[0] not in ("fit", "validate"):
        return _fail(f"unknown subcommand {argv[0]!r}; choose one of fit, validate, plan, export, bench, generate, "
                     "build-ops")
    if any(arg in ("-h", "--help", "--help=all") for arg in argv[1:]):
        try:
            return print_help(argv)
        except InputError as err:
            return _fail(str(err))
    try:
        return run_lightning(argv, from_sys_argv)
    except InputError as err:
        return _fail(str(err))


if __name__ == "__main__":
    sys.exit(main())
