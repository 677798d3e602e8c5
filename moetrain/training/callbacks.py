"""Training callbacks: ``metrics.jsonl``, one JSON object per logged optimizer step, and an experiment logger.

Each line is written and flushed as soon as the step is logged, so a crash loses nothing that was
logged. Fields: ``step, loss, ce_loss, aux_loss, lr, grad_norm, tokens, tokens_per_s, elapsed_s, startup_s``
(seconds from the process's start to training's), ``host/rss_anon_gib`` and ``host/rss_shared_gib`` (Linux),
``aux_loss/layer_<i>`` and ``routing/entropy_layer_<i>`` per MoE layer (``routing/entropy_mean``),
``mfu`` and ``gpu/mem_*_gib`` on a GPU, plus whatever the optimizer's optional ``telemetry()``
returns (the offload engine's counters). The same numbers go to the experiment logger
(``metrics.logger``: wandb, csv or tensorboard, :mod:`moetrain.training.loggers`), with an expert-load
heatmap image every ``heatmap_every_n_steps`` steps; the load matrices behind the heatmaps are
appended to ``expert_load.jsonl`` and validation results to ``validation.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import IO, Any, Optional

import lightning as L
import torch

from moetrain.atomic import write_text
from moetrain.training.loggers import LOGGERS, Sink, make_sink
from moetrain.training.telemetry import (
    figure_png,
    gpu_memory,
    host_memory,
    load_entropy,
    load_heatmap,
    peak_flops,
    training_flops_per_token,
)

METRICS_FILE = "metrics.jsonl"
EXPERT_LOAD_FILE = "expert_load.jsonl"
VALIDATION_FILE = "validation.jsonl"


def _number(value: Any) -> Any:
    """A JSON-safe scalar: tensors become Python numbers, NaN/inf become strings (JSON has neither)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger(L.Callback):
    """Append one line per logged optimizer step to ``<trainer.default_root_dir>/metrics.jsonl``.

    ``tokens`` counts every input token trained on so far (the module's count, which checkpoints save);
    ``tokens_per_s`` is the throughput since the previous logged line (the first window includes start-up
    work such as the first compiles). Under several ranks the losses, token counts, gradient norm, routing
    entropy and expert loads are the global batch's (the module reduces them on the logged steps), and the
    validation figures are over every rank's shard; the offload engine's ``offload/...`` counters are global
    rank 0's own (each rank pages its own share of the experts over its own link). Only global rank 0 writes.

    A run continues the files of its run directory from the step it starts at: a resumed run appends
    after the lines of its checkpoint's steps and first drops the lines of later steps (written by the
    interrupted run after that checkpoint), here and in ``expert_load.jsonl`` and ``validation.jsonl``, so
    that each step has one line. (``moetrain fit`` refuses a used run directory unless it resumes.)
    """

    def __init__(
        self,
        filename: str = METRICS_FILE,
        logger: str = "none",
        project: str = "moetrain",
        run_name: Optional[str] = None,
        tags: Optional[list[str]] = None,
        wandb_mode: Optional[str] = None,
        heatmap_every_n_steps: int = 50,
        peak_tflops: Optional[float] = None,
    ) -> None:
        """
        Args:
            filename: file name inside the run directory.
            logger: experiment logger besides metrics.jsonl: ``none``, ``wandb``, ``csv`` or ``tensorboard``.
            project: W&B project.
            run_name: W&B run name (None: W&B picks one).
            tags: W&B tags.
            wandb_mode: ``online``, ``offline`` or ``disabled``; None: the ``WANDB_MODE`` environment variable, else
                online.
            heatmap_every_n_steps: log a per-layer x per-expert load heatmap every N optimizer steps (0: never);
                when ``model.log_every_n_steps`` does not divide N, at the first logged step at or after each multiple.
            peak_tflops: the device's peak bf16 TFLOP/s for MFU (None: looked up for known GPUs; no MFU on CPU).
        """
        if logger not in LOGGERS:
            raise ValueError(f"metrics.logger={logger!r}: choose one of {', '.join(LOGGERS)}")
        if heatmap_every_n_steps < 0:
            raise ValueError(f"metrics.heatmap_every_n_steps must be >= 0, got {heatmap_every_n_steps}")
        self.logger = logger
        self.project = project
        self.run_name = run_name
        self.tags = list(tags or [])
        self.wandb_mode = wandb_mode
        self.heatmap_every_n_steps = heatmap_every_n_steps
        self.peak_tflops = peak_tflops
        self.run_id: Optional[str] = None
        """The experiment logger's run id (W&B); checkpointed, so a resumed run continues the same run."""
        self.sink: Optional[Sink] = None
        self.last_record: dict[str, Any] = {}
        self._heat_load: Optional[torch.Tensor] = None
        self._heat_from = 1
        self._flops_per_token: Optional[float] = None
        self.filename = filename
        self.path: Optional[Path] = None
        self._file: Optional[IO[str]] = None
        self._start = 0.0
        self._startup_s = 0.0
        self._window_start = 0.0
        self._window_tokens = 0
        self._seen_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path = Path(trainer.default_root_dir) / self.filename
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._start = self._window_start = time.perf_counter()
        import psutil

        # start-up: from the process's start (imports, checks, the build, the load, the store's fill) to training
        self._startup_s = round(time.time() - psutil.Process().create_time(), 1)
        self._seen_step = -1  # the first step seen opens the files (see _begin), also in a second fit
        config = getattr(pl_module, "model_config", None)
        if config is not None and self._flops_per_token is None:
            self._flops_per_token = training_flops_per_token(config)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stats = getattr(pl_module, "last_step", None)
        if stats is None or stats.step == self._seen_step:
            return  # a micro-batch that did not end an optimizer step
        if self._seen_step < 0:
            self._begin(stats.step - 1)  # the first step of this run: it started (or resumed) after stats.step - 1
        self._seen_step = stats.step
        self._window_tokens += stats.tokens
        if not stats.should_log:
            return
        now = time.perf_counter()
        record = {
            "step": stats.step,
            "loss": _number(stats.loss),
            "ce_loss": _number(stats.ce_loss),
            "aux_loss": _number(stats.aux_loss),
            "lr": stats.lr,
            "grad_norm": _number(stats.grad_norm),
            "tokens": stats.total_tokens,
            "tokens_per_s": round(self._window_tokens / max(now - self._window_start, 1e-9), 1),
            "elapsed_s": round(now - self._start, 3),
            "startup_s": self._startup_s,
        }
        optimizer = pl_module.train_optimizer
        step_metrics = getattr(pl_module, "step_metrics", None)
        for figures in (optimizer.telemetry() if optimizer is not None else {},
                        step_metrics() if callable(step_metrics) else {}):
            for key, value in figures.items():
                record.setdefault(key, _number(value))
        record.update(self._model_metrics(pl_module, stats, record["tokens_per_s"]))
        self._window_start, self._window_tokens = now, 0
        self.last_record = record
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        if trainer.is_global_zero:
            self._to_sink(trainer, pl_module, record, stats.step)

    def _begin(self, start_step: int) -> None:
        """Open metrics.jsonl for this run, which starts after optimizer step ``start_step`` (0: a new run):
        the lines of later steps in the run directory's files belong to a run this one replaces."""
        self._heat_from = start_step + 1
        if self.path is None:
            return  # not global rank 0
        for path in (self.path, self.path.parent / EXPERT_LOAD_FILE, self.path.parent / VALIDATION_FILE):
            drop_records_after(path, start_step)
        self._file = open(self.path, "a")

    def _model_metrics(self, pl_module: L.LightningModule, stats: Any, tokens_per_s: float) -> dict[str, Any]:
        """Per-layer aux loss and routing entropy, MFU and GPU memory (one device read per logged step)."""
        out: dict[str, Any] = {}
        layers = [layer.layer_idx for layer in pl_module.model.model.layers if layer.is_moe] \
            if hasattr(pl_module, "model") else []
        if getattr(stats, "layer_aux_loss", None) is not None:
            for i, value in zip(layers, stats.layer_aux_loss.tolist(), strict=True):
                out[f"aux_loss/layer_{i}"] = _number(value)
        take = getattr(pl_module, "take_expert_load", None)
        load = take() if callable(take) else None
        if load is not None:
            load = load.detach().cpu()
            entropy = load_entropy(load)
            for i, value in zip(layers, entropy.tolist(), strict=True):
                out[f"routing/entropy_layer_{i}"] = round(value, 6)
            out["routing/entropy_mean"] = round(float(entropy.mean()), 6)
            self._heat_load = load if self._heat_load is None else self._heat_load + load
        peak = self.peak_tflops * 1e12 if self.peak_tflops else peak_flops(pl_module.device)
        if peak and self._flops_per_token:
            out["mfu"] = round(self._flops_per_token * tokens_per_s / peak, 5)
        out.update({k: round(v, 4) for k, v in gpu_memory(pl_module.device).items()})
        out.update({k: round(v, 3) for k, v in host_memory().items()})
        return out

    def _to_sink(self, trainer: L.Trainer, pl_module: L.LightningModule, record: dict[str, Any], step: int) -> None:
        """Send the record to the experiment logger; every heatmap_every_n_steps, the expert-load heatmap too."""
        # due when a multiple of N lies in the window since the last heatmap: with model.log_every_n_steps not
        # dividing N, the first logged step past each multiple (not only the common multiples)
        every = self.heatmap_every_n_steps
        heatmap_due = every and step // every > (self._heat_from - 1) // every and self._heat_load is not None
        if heatmap_due:
            layers = [layer.layer_idx for layer in pl_module.model.model.layers if layer.is_moe]
            self._append(EXPERT_LOAD_FILE, {"step": step, "from_step": self._heat_from, "layers": layers,
                                            "load": self._heat_load.tolist()})
        if self.logger != "none":
            sink = self._open_sink(trainer, pl_module)
            sink.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step)
            if heatmap_due:
                title = f"expert load, steps {self._heat_from}-{step}"
                sink.log_image("routing/expert_load", figure_png(load_heatmap(self._heat_load, layers, title=title)),
                               step)
        if heatmap_due:
            self._heat_load, self._heat_from = None, step + 1

    def _open_sink(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Sink:
        # opened at the first logged step, after a resume has put the checkpointed run id back
        if self.sink is None:
            import yaml

            recipe = getattr(pl_module, "resolved_recipe", None)
            config = yaml.safe_load(recipe) if recipe else {}
            self.sink = make_sink(self.logger, Path(trainer.default_root_dir), config or {}, project=self.project,
                                  name=self.run_name, tags=self.tags, run_id=self.run_id, wandb_mode=self.wandb_mode)
            assert self.sink is not None
            self.run_id = self.sink.run_id
        return self.sink

    def _append(self, filename: str, record: dict[str, Any]) -> None:
        path = Path(self.path.parent if self.path is not None else ".") / filename
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Validation loss and perplexity of a validation run inside ``fit`` (validation.jsonl and the logger)."""
        if trainer.sanity_checking or not trainer.is_global_zero or self.path is None:
            return
        record = {"step": trainer.global_step}
        for key in ("val_loss", "val_ce_loss", "val_aux_loss", "val_ppl"):
            if key in trainer.callback_metrics:
                record[key] = _number(trainer.callback_metrics[key])
        self._append(VALIDATION_FILE, record)
        if self.logger != "none":
            self._open_sink(trainer, pl_module).log({k: v for k, v in record.items() if k != "step"},
                                                    max(trainer.global_step, 1))

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints (Lightning's callback-state mechanism) so that a resumed run continues the
        experiment logger's run. (The token count is the module's, saved once as the trainer state's ``tokens``.)"""
        return {"run_id": self.run_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # checkpoints of earlier versions also hold a "tokens" here, one step low when saved by a signal or
        # every_n_steps; the trainer state's own "tokens" is the count a resume continues from
        self.run_id = state_dict.get("run_id") or self.run_id

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.sink is not None:
            self.sink.finish()
            self.sink = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()


def logger_run_id(trainer: L.Trainer) -> Optional[str]:
    """The experiment logger's run id of ``trainer`` (W&B), or None; checkpoints store it for resume."""
    for callback in trainer.callbacks:
        if isinstance(callback, MetricsLogger):
            return callback.run_id
    return None


def drop_records_after(path: Path, step: int) -> None:
    """Rewrite the JSON-lines file ``path`` (if present) without the records of steps after ``step``.

    Atomic (a crash leaves the old file or the new one); untouched when no record is dropped.
    """
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and _record_step(line) <= step]
    if len(kept) != len([line for line in lines if line.strip()]):
        write_text(path, "".join(line + "\n" for line in kept))


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, TypeError, AttributeError):
        return 0  # a line torn by a crash or written by hand: kept, never the reason to rewrite


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
