"""One run per run directory: ``moetrain fit`` into a directory that already holds a run resumes it or is refused.

A run directory (``trainer.default_root_dir``) is *used* once a run has logged a step (a non-empty
``metrics.jsonl``) or saved a checkpoint (``checkpoints/last`` or a ``checkpoints/step-<N>``). Training into
it again from step 0 would append a second run's steps 1, 2, ... after the first run's last step and move
``checkpoints/last`` back, so ``fit`` without ``--ckpt_path`` refuses, naming the three ways on:

* ``--ckpt_path=last``: continue the run that is there (its files continue from the checkpoint's step);
* a new ``--trainer.default_root_dir``: start a new run elsewhere;
* ``--overwrite_run=true``: delete the run's files here (:data:`RUN_FILES`) and start again.

The check runs before the model is built, so a refusal costs nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from moetrain.config import ConfigError

OVERWRITE_FLAG = "--overwrite_run=true"
CHECKPOINTS_DIR = "checkpoints"
RUN_FILES = ("expert_load.jsonl", "validation.jsonl")
"""Files a run writes besides its metrics file; ``--overwrite_run`` deletes them with it."""
RUN_DIRS = (CHECKPOINTS_DIR, "csv", "tensorboard")
"""Folders a run writes (checkpoints, experiment-logger files); ``--overwrite_run`` deletes them."""


def _last_step(metrics: Path) -> Optional[int]:
    """The step of the last parsable line of ``metrics`` (None: no such line)."""
    for line in reversed(metrics.read_text().splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def describe_run(run_dir: Path, metrics_file: str = "metrics.jsonl") -> Optional[str]:
    """What run ``run_dir`` holds ("metrics.jsonl up to step 60; checkpoints/last names step-60"), or None
    when it holds none (missing, empty, or only files of a run that stopped before its first step)."""
    found = []
    metrics = run_dir / metrics_file
    if metrics.is_file() and metrics.stat().st_size > 0:
        step = _last_step(metrics)
        found.append(f"{metrics_file} up to step {step}" if step is not None else f"a non-empty {metrics_file}")
    checkpoints = run_dir / CHECKPOINTS_DIR
    last = checkpoints / "last"
    if last.is_file():
        found.append(f"{CHECKPOINTS_DIR}/last names {last.read_text().strip()}")
    elif checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir()):
        found.append(f"checkpoint folders in {CHECKPOINTS_DIR}/")
    return "; ".join(found) or None


def check_run_dir(run_dir: str | Path, *, resume: Optional[str], overwrite: bool, metrics_file: str = "metrics.jsonl",
                  delete: bool = True) -> None:
    """Refuse to start a new run in a used run directory; with ``overwrite``, empty it of the old run first.

    Args:
        run_dir: ``trainer.default_root_dir``.
        resume: ``--ckpt_path`` (None: a new run from step 0).
        overwrite: ``--overwrite_run``: delete the old run's metrics, logs and checkpoints.
        metrics_file: ``metrics.filename``.
        delete: whether this process deletes (only one process of a multi-process launch does).

    Raises:
        ConfigError: the directory holds a run and neither ``resume`` nor ``overwrite`` says what to do with it,
            or both are given.
    """
    run_dir = Path(run_dir)
    if overwrite and resume is not None:
        raise ConfigError(f"--ckpt_path={resume} and {OVERWRITE_FLAG} contradict each other: the first continues "
                          f"a run, the second deletes the run in {run_dir} to start again. Drop one of them.")
    held = describe_run(run_dir, metrics_file)
    if held is None or resume is not None:
        return
    if not overwrite:
        raise ConfigError(
            f"trainer.default_root_dir={run_dir} already holds a run ({held}); training into it again would mix "
            f"two runs in its {metrics_file} and checkpoints. To continue that run, add --ckpt_path=last; to start "
            f"a new run, pass a new --trainer.default_root_dir=DIR, or add {OVERWRITE_FLAG} to delete the old "
            f"run's {metrics_file}, logs and checkpoints in {run_dir} first.")
    if delete:
        for name in (metrics_file, *RUN_FILES):
            (run_dir / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(run_dir / name, ignore_errors=True)
