"""Experiment loggers behind ``metrics.logger``: Weights & Biases, CSV or TensorBoard.

Each sink takes flat ``{name: number}`` dicts per optimizer step and PNG images (expert-load
heatmaps). ``metrics.jsonl`` is always written besides (:mod:`moetrain.training.callbacks`).

Weights & Biases: the run goes to ``<run dir>/wandb/``; ``WANDB_MODE=offline`` (or
``metrics.wandb_mode: offline``) writes it there with no network (``wandb sync`` uploads it later).
The run id is part of the metrics logger's checkpointed state, so a run resumed from a checkpoint
continues the same W&B run (``resume="allow"``).
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any, Optional, Protocol

LOGGERS = ("none", "wandb", "csv", "tensorboard")


class Sink(Protocol):
    run_id: Optional[str]

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, key: str, png: bytes, step: int) -> None: ...

    def finish(self) -> None: ...


def _png_array(png: bytes) -> Any:
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))  # (H, W, 3) uint8


class WandbSink:
    """A Weights & Biases run (created, or resumed when ``run_id`` names an existing one)."""

    def __init__(self, run_dir: Path, project: str, name: Optional[str], tags: list[str], config: dict[str, Any],
                 run_id: Optional[str], mode: Optional[str]) -> None:
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id or uuid.uuid4().hex[:8]  # W&B ids: short lowercase alphanumerics
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True)
        self.run = wandb.init(project=project, name=name, tags=tags or None, config=config, dir=str(run_dir),
                              id=self.run_id, resume="allow", mode=mode or os.environ.get("WANDB_MODE") or "online",
                              settings=settings, reinit="create_new")
        self._wandb = wandb

    @property
    def run_path(self) -> Path:
        """The run's local directory (``.../wandb/offline-run-...-<id>`` or ``run-...``)."""
        return Path(self.run.dir).parent

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, key: str, png: bytes, step: int) -> None:
        self.run.log({key: self._wandb.Image(_png_array(png), caption=f"step {step}")}, step=step)

    def finish(self) -> None:
        self.run.finish()


class CsvSink:
    """Lightning's CSV logger: ``<run dir>/csv/metrics.csv``; images as ``<run dir>/csv/images/<key>-<step>.png``."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from lightning.pytorch.loggers import CSVLogger

        self.logger = CSVLogger(save_dir=str(run_dir), name="", version="csv")
        self.logger.log_hyperparams(config)
        self.run_id: Optional[str] = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logger.log_metrics(metrics, step=step)
        self.logger.save()

    def log_image(self, key: str, png: bytes, step: int) -> None:
        path = Path(self.logger.log_dir) / "images" / f"{key.replace('/', '_')}-{step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)

    def finish(self) -> None:
        self.logger.finalize("success")


class TensorBoardSink:
    """Lightning's TensorBoard logger: event files in ``<run dir>/tensorboard/``."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        self.logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard", default_hp_metric=False)
        self.logger.log_hyperparams(config)
        self.run_id: Optional[str] = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logger.log_metrics(metrics, step=step)

    def log_image(self, key: str, png: bytes, step: int) -> None:
        self.logger.experiment.add_image(key, _png_array(png), step, dataformats="HWC")

    def finish(self) -> None:
        self.logger.finalize("success")


def make_sink(kind: str, run_dir: Path, config: dict[str, Any], *, project: str = "moetrain",
              name: Optional[str] = None, tags: Optional[list[str]] = None, run_id: Optional[str] = None,
              wandb_mode: Optional[str] = None) -> Optional[Sink]:
    """The sink for ``metrics.logger`` (None for ``none``)."""
    if kind == "none":
        return None
    if kind == "wandb":
        return WandbSink(run_dir, project, name, list(tags or []), config, run_id, wandb_mode)
    if kind == "csv":
        return CsvSink(run_dir, config)
    if kind == "tensorboard":
        return TensorBoardSink(run_dir, config)
    raise ValueError(f"metrics.logger={kind!r}: choose one of {', '.join(LOGGERS)}")
