"""How ``moetrain fit --help`` and ``validate --help`` read: moetrain's sections first with every key described,
then the Trainer keys that recipes set (``--help=all``: every Trainer option). Parsing is unchanged."""

from __future__ import annotations

import re
from typing import Any

from moetrain.lightning_cli.errors import PROG

SECTION_TITLES = {
    "model": "model: the model to fine-tune and how its steps run",
    "model.optimizer": "model.optimizer: AdamW, learning-rate schedule and gradient clipping",
    "model.offload": "model.offload: where the routed experts' optimizer state (and weights) live",
    "data": "data: JSONL training and validation data, tokenizer and packing",
    "checkpoint": "checkpoint: sharded checkpoints under <run directory>/checkpoints/",
    "metrics": "metrics: metrics.jsonl, an experiment logger and expert-load heatmaps",
    "progress": "progress: the bar over optimizer steps",
    "profile": "profile: trace the end of one optimizer step (profile_step_N.json: GPU kernels, host ops)",
    "parallel": "parallel: how the ranks of a several-GPU run share the model",
    "model.inference": "model.inference: validate only: paged routed experts (a model larger than the GPU)",
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
    if subcommand == "fit" and "model.inference" in groups:  # validate only (fit refuses it): not in fit's help
        sections.remove(groups["model.inference"])
    # a section's nested groups (model.offload.placement, ...) are listed inside it, each under its --GROUP line
    nested = {name: max((s for s in SECTION_TITLES if name.startswith(f"{s}.")), key=len) for name in groups
              if name not in SECTION_TITLES and any(name.startswith(f"{s}.") for s in SECTION_TITLES)}
    for name, section in nested.items():
        if section in groups:
            for action in groups[name]._group_actions:
                if action.dest == name and groups[name].title:  # the group's --GROUP CONFIG: say what it holds
                    action.help = f"{' '.join(groups[name].title.split())} (a YAML file of the keys below)."
            groups[section]._group_actions.extend(groups[name]._group_actions)
    method = [g for name, g in groups.items() if name not in SECTION_TITLES and name not in nested
              and name != "trainer"]
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
