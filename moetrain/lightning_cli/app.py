"""The ``fit`` and ``validate`` commands as a :class:`~lightning.pytorch.cli.LightningCLI`: moetrain's sections,
defaults, checks before the model is built, and checkpoint resolution."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from moetrain.lightning_cli.errors import InputError, instantiation_error_message, trainer_error_message
from moetrain.lightning_cli.help import shape_help


def build_cli_class() -> type:
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
    from moetrain.training.step_profiler import StepProfiler

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
            parser.add_lightning_class_args(StepProfiler, "profile")
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
            if self.subcommand == "fit" and several_ranks(trainer) and trainer.get("strategy") in (None, "auto",
                                                                                              "ddp"):
                from moetrain.parallel.strategy import register

                trainer["strategy"] = register()  # DDP's processes; moetrain.parallel reduces the gradients
            if self.subcommand == "fit" and self.config["fit"]["model"]["inference"]["expert_weights"] == "paged":
                raise InputError("model.inference.expert_weights=paged is for validate (paged experts do not "
                                 "train); drop it from fit, or train a model larger than the GPU with "
                                 "model.offload.placement.tier=cpu")
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
                raise InputError(trainer_error_message(err, self._trainer_config())) from None
            # the data last: reading and tokenizing it is the slowest check (and comes before a run is overwritten)
            self.prepared_data = preflight.prepare_data(self.config[self.subcommand]["data"], self.subcommand)
            if self.subcommand == "fit":
                config = self.config["fit"]
                check_run_dir(trainer.get("default_root_dir") or Path.cwd(), resume=config.get("ckpt_path"),
                              overwrite=bool(config.get("overwrite_run")),
                              metrics_file=config["metrics"].get("filename") or "metrics.jsonl",
                              delete=launched_as_rank_zero())

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, TypeError) as err:
                # a section's constructor refused its values (OffloadPlan and friends validate in
                # __post_init__); jsonargparse wraps that message in its own, so unwrap it
                if isinstance(err, (ConfigError, DataError)):
                    raise
                raise InputError(instantiation_error_message(err)) from None
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
                raise InputError(trainer_error_message(err, self._trainer_config())) from None

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
                raise InputError(trainer_error_message(err, self._trainer_config())) from None

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


def several_ranks(trainer: dict) -> bool:
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


def launched_as_rank_zero() -> bool:
    """Whether this process is (or will be) global rank 0 of its launch, from the launchers' environment
    (torchrun's RANK, Lightning's LOCAL_RANK and NODE_RANK for the processes it starts, SLURM's SLURM_PROCID)."""
    import os

    return all(os.environ.get(key, "0") == "0" for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))
