"""The LightningModule that trains an MoE language model with manual optimization.

Why manual optimization: the optimizer (plain AdamW, or the offload engine that pages expert state in and out) must
decide itself when and how each parameter group is stepped, and it needs the global gradient norm and the learning
rate from us, not a ``torch.optim`` scheduler. Gradient accumulation happens here, not in the Trainer: each
``training_step`` is one micro-batch; its loss is divided by ``accumulate_grad_batches`` before backward, and the last
micro-batch of a group clips, steps and zeroes the optimizer (:mod:`moetrain.training.step_timing` times the parts).

Counting steps: Lightning's ``trainer.global_step`` counts ``step()`` calls of the optimizers it knows about. The
module hands Lightning an :class:`OptimizerStepAdapter` that wraps the real :class:`~moetrain.optim.TrainOptimizer`,
so every accumulated optimizer step is one ``global_step`` and ``--trainer.max_steps=20`` means 20 optimizer steps
(not micro-batches); the Trainer's own ``accumulate_grad_batches`` must stay 1.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning as L
import torch

from moetrain.config import ConfigError, ModelConfig
from moetrain.inference.config import InferenceConfig
from moetrain.models.balance import BiasBalancer
from moetrain.models.decoder import RESIDUAL_DTYPES, MoEForCausalLM
from moetrain.models.train_selection import TrainSelection, apply_train_selection, resolve_train_selection
from moetrain.models.varlen import batch_spans
from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadPlan, OffloadSettings, resolve
from moetrain.offload.staged_init import restore_masters
from moetrain.optim import OptimizerConfig, TrainOptimizer, lr_at
from moetrain.training import trainer_state
from moetrain.training.checkpoint import load_weights_into, verify_checkpoint
from moetrain.training.model_build import build_model
from moetrain.training.optimizer_state import load_optimizer
from moetrain.training.step_adapter import OptimizerStepAdapter, StepStats
from moetrain.training.step_profiler import OPTIMIZER_RANGE
from moetrain.training.step_timing import StepTimer


def _world_size() -> int:
    """Processes in the default process group (1 without one): validation shards its data over them."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class MoETrainingModule(L.LightningModule):
    """Full fine-tuning of a :class:`~moetrain.models.decoder.MoEForCausalLM` (the ``model:`` section of a recipe)."""

    def __init__(
        self,
        preset: str = "tiny-deepseek-moe",
        config: Optional[dict[str, Any]] = None,
        init_from: Optional[str] = None,
        optimizer: OptimizerConfig = OptimizerConfig(),  # noqa: B008  (a frozen-by-convention default)
        offload: OffloadSettings = OffloadSettings(),  # noqa: B008
        accumulate_grad_batches: int = 1,
        log_every_n_steps: int = 1,
        expert_impl: str = "auto",
        activation_checkpointing: bool = False,
        residual_dtype: str = "fp32",
        train: Union[Literal["all"], TrainSelection] = "all",
        inference: InferenceConfig = InferenceConfig(),  # noqa: B008
    ) -> None:
        """
        Args:
            preset: model shape, a name under ``configs/models/`` (or a YAML path); ignored with ``init_from``.
            config: overrides of the preset's fields, e.g. ``{num_hidden_layers: 2}``.
            init_from: a Hugging Face model directory (or moetrain checkpoint) to fine-tune; None trains from
                a random initialisation of ``preset``.
            optimizer: AdamW, schedule and clipping settings.
            offload: where the routed experts' optimizer state lives (``placement.tier: none|cpu|nvme``), resolved
                once into :attr:`offload_cfg`.
            accumulate_grad_batches: micro-batches per optimizer step.
            log_every_n_steps: write a ``metrics.jsonl`` line every this many optimizer steps (and at the last).
            expert_impl: expert compute path, ``auto``, ``grouped`` or ``loop``.
            activation_checkpointing: keep each decoder layer's input only, recompute the layer in backward
                (less activation memory, a third more compute).
            residual_dtype: fp32 or bf16 residual stream under autocast.
            train: what trains: ``all``, or a mapping of groups (embeddings, attention, norms, routers,
                shared_experts, dense_mlp, lm_head: true/false; routed_experts: all, none or a selection file).
            inference: ``validate`` only: ``expert_weights: paged`` builds the model with its routed experts in
                host memory, paged onto the device through an expert cache (:mod:`moetrain.inference`).
        """
        super().__init__()
        if accumulate_grad_batches < 1:
            raise ConfigError(f"model.accumulate_grad_batches must be at least 1, got {accumulate_grad_batches}")
        if log_every_n_steps < 1:
            raise ConfigError(f"model.log_every_n_steps must be at least 1, got {log_every_n_steps}")
        if expert_impl not in ("auto", "grouped", "loop"):
            raise ConfigError(f"model.expert_impl={expert_impl!r}: choose auto, grouped or loop")
        if residual_dtype not in RESIDUAL_DTYPES:
            raise ConfigError(f"model.residual_dtype={residual_dtype!r}: choose fp32 or bf16")
        self.automatic_optimization = False
        # copies: the defaults in the signature are shared between instances
        self.optim_cfg = dataclasses.replace(optimizer)
        self.offload_cfg: OffloadPlan = resolve(offload)  # every rule of the section checked once, here
        self.inference_cfg = dataclasses.replace(inference)
        self.accumulate_grad_batches = accumulate_grad_batches
        self.log_every_n_steps = log_every_n_steps
        self._prebuilt_store: Optional[Any] = None  # experts' masters streamed into their tier at the build
        train = resolve_train_selection(train, offload_tier=self.offload_cfg.tier)  # before a build of minutes
        self.model = self._build_model(preset, config, init_from, train)
        self.train_summary = apply_train_selection(self.model, train)
        self.model.set_expert_impl(expert_impl)
        self.model.set_activation_checkpointing(activation_checkpointing)
        self.model.set_residual_dtype(residual_dtype)
        # DeepSeek-V3's auxiliary-loss-free balancing (inactive for other routers, or at speed 0)
        self.balancer = BiasBalancer(self.model, speed=self.train_summary.bias_update_speed)
        self.train_optimizer: Optional[TrainOptimizer] = None
        self.last_step: Optional[StepStats] = None
        self.total_steps = 0
        self.resolved_recipe: Optional[str] = None  # the resolved recipe as YAML; the CLI sets it, checkpoints store it
        self._resume_dir: Optional[Path] = None
        # a moetrain.parallel.runtime.ParallelRuntime (the CLI's parallel: section; None: one process): builds the
        # optimizer, scales the loss, reads and writes checkpoints across ranks
        self.parallel: Optional[Any] = None
        self._micro = 0
        self.step_timer = StepTimer()  # the time/... figures of each metrics line
        self._sums: dict[str, torch.Tensor] = {}
        self._tokens = 0
        self.tokens_seen = 0  # input tokens trained on since step 0, all ranks (checkpoints save it, logs read it)
        self._expert_load: Optional[torch.Tensor] = None  # (M, E) routed tokens of the steps not yet reduced
        self._logged_load: Optional[torch.Tensor] = None  # (M, E) of the logged steps, all ranks, not yet taken
        self._val_ce = torch.zeros(2)  # [sum of token cross-entropies, target tokens] of this validation run

    def _build_model(self, preset: str, overrides: Optional[dict[str, Any]], init_from: Optional[str],
                     train: Optional[TrainSelection] = None) -> MoEForCausalLM:
        model, self._prebuilt_store = build_model(preset, overrides, init_from, train=train, offload=self.offload_cfg,
                                                  inference=self.inference_cfg)
        return model

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config

    @property
    def micro_batch(self) -> int:
        """Micro-batches of the coming optimizer step already trained (forward and backward): 0 to ``accum - 1``."""
        return self._micro

    @property
    def at_step_boundary(self) -> bool:
        """Whether no micro-batch of the coming optimizer step has run yet: the model, the optimizer and the
        counters hold the state of one optimizer-step boundary, the only moment a checkpoint can capture."""
        return self._micro == 0

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        """Check the tokenizer against the model's vocabulary before any step runs."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "load_tokenizer"):
            return
        tokenizer = datamodule.load_tokenizer()
        if tokenizer.vocab_size > self.model_config.vocab_size:
            raise ConfigError(f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's "
                              f"vocab_size is {self.model_config.vocab_size}; use a matching tokenizer or set "
                              f"model.config.vocab_size >= {tokenizer.vocab_size}")
        if self.model_config.eos_token_id is None:
            self.model_config.eos_token_id = tokenizer.eos_id

    def teardown(self, stage: str) -> None:
        """When fit ends, release the offload engine: its hooks, its CPU step thread and its swap file (as large as
        the experts' optimizer state). Lightning calls this after a normal end only; the CLI calls
        :meth:`release_offload` after errors and Ctrl-C as well."""
        if stage == "fit":
            self.release_offload()

    def cpu(self) -> MoETrainingModule:
        """Stay put (``.to("cpu")`` still moves): Lightning's teardown calls ``cpu()``, which copied DeepSeek-MoE-16B's
        GPU tensors into pageable host memory (1.1 GiB/s to an OOM kill, hiding the error that had ended the fit)."""
        return self

    def release_offload(self) -> None:
        """Close the optimizer's offload engine, deleting its swap file, and a store that ``init_from`` filled but
        no optimizer took. Idempotent; nothing to do for plain AdamW."""
        if self.train_optimizer is not None:
            self.train_optimizer.close()
        store, self._prebuilt_store = self._prebuilt_store, None
        if store is not None:
            store.close()

    def configure_callbacks(self) -> list[L.Callback]:
        """The host memory guard (:class:`~moetrain.training.host_guard.HostMemoryGuard`: a clean stop before the
        OOM killer's); with paged experts, validation reports the expert cache
        (:class:`~moetrain.inference.validation.PagedValidation`)."""
        from moetrain.training.host_guard import HostMemoryGuard

        callbacks: list[L.Callback] = [HostMemoryGuard()]
        if self.inference_cfg.paged:
            from moetrain.inference.validation import PagedValidation

            callbacks.append(PagedValidation())
        return callbacks

    def configure_optimizers(self) -> OptimizerStepAdapter:
        store, self._prebuilt_store = self._prebuilt_store, None
        several = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1  # parallel.active is set only by its build_optimizer below
        if store is not None and self.parallel is not None and several:
            # ranks keep only their share of the experts' state: give the masters back to the parameters
            # (fp32, as a model loaded onto the device has them) and let each rank build its own store
            restore_masters(self.model, store)
            store = None
        if store is not None:
            self.train_optimizer = build_optimizer(self.model, self.optim_cfg, self.offload_cfg, store=store)
        else:
            build = build_optimizer if self.parallel is None else self.parallel.build_optimizer
            self.train_optimizer = build(self.model, self.optim_cfg, self.offload_cfg)
        self.total_steps = self._schedule_steps()
        if self._resume_dir is not None:
            load = load_optimizer if self.parallel is None else self.parallel.load_optimizer
            load(self.train_optimizer, self.model, self._resume_dir)
        return OptimizerStepAdapter(self.train_optimizer, [p for p in self.model.parameters() if p.requires_grad])

    # ------------------------------------------------------------------ checkpoints
    def load_weights_from(self, ckpt_dir: str | Path) -> None:
        """Stream the model weights of a moetrain checkpoint into this module's model (shapes must match)."""
        saved = verify_checkpoint(ckpt_dir, optimizer=False)
        if saved.to_dict() | {"eos_token_id": None} != self.model_config.to_dict() | {"eos_token_id": None}:
            diff = sorted(k for k, v in saved.to_dict().items()
                          if k != "eos_token_id" and v != self.model_config.to_dict().get(k))
            raise ConfigError(f"{ckpt_dir}: the checkpoint's model config differs from the recipe's model section "
                              f"({', '.join(diff[:4])}); resume with the recipe the checkpoint was trained with "
                              "(its recipe.yaml)")
        if self.inference_cfg.paged:
            from moetrain.inference.paged import load_paged_weights

            return load_paged_weights(self.model, ckpt_dir, self.inference_cfg)
        # experts whose masters already live in a store (init_from with a tier) take the saved masters there
        sink = self._prebuilt_store.write_master if self._prebuilt_store is not None else None
        load_weights_into(self.model, ckpt_dir, expert_sink=sink)
        if self._prebuilt_store is not None:
            self._prebuilt_store.finish_staged()

    def resume_from(self, ckpt_dir: str | Path) -> None:
        """Continue training from a checkpoint, checked whole first (nothing is loaded from a damaged one): the model
        weights now; the optimizer state in ``configure_optimizers``; the step, the data position inside the epoch,
        RNG and callback states in ``on_train_start`` (:mod:`moetrain.training.trainer_state`), so that the run
        continues exactly as if uninterrupted."""
        verify_checkpoint(ckpt_dir)
        self.load_weights_from(ckpt_dir)
        self._resume_dir = Path(ckpt_dir)

    def on_train_start(self) -> None:
        if self._resume_dir is None:
            return
        trainer_state.restore(self.trainer, self, trainer_state.read(self._resume_dir))

    def _schedule_steps(self) -> int:
        """Length of the cosine schedule in optimizer steps."""
        if self.optim_cfg.max_steps:
            return self.optim_cfg.max_steps
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return self.trainer.max_steps
        # no step budget: the epochs decide; estimated_stepping_batches counts micro-batches here
        return max(int(self.trainer.estimated_stepping_batches) // self.accumulate_grad_batches, 1)

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict[str, torch.Tensor]):
        return self.model(
            batch["input_ids"], labels=batch.get("labels"), position_ids=batch.get("position_ids"),
            document_ids=batch.get("document_ids"), attention_mask=batch.get("attention_mask"),
            return_logits=False, spans=batch_spans(batch),  # the loss alone: chunked, no (B, L, V) fp32 logits
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        assert self.train_optimizer is not None
        self.step_timer.mark_micro(self._micro, self.device)  # the first micro-batch's mark is the step's start
        # the offload engine steps a layer's experts once the last micro-batch passed it (others ignore it)
        self.train_optimizer.begin_micro_batch(self._micro, self.accumulate_grad_batches,
                                               lr_at(self.optim_cfg, self.trainer.global_step, self.total_steps))
        out = self(batch)
        if self.balancer.active:
            self.balancer.observe(out.routings)
        # several ranks: this rank's share of the global batch's loss (gradients are summed over ranks); the
        # logged figures are the same shares, summed over the ranks on the logged steps (_reduce_logged)
        shares = None if self.parallel is None else self.parallel.loss_shares(out, batch)
        if shares is None:
            loss, ce_loss, aux_loss, aux_scale = out.loss, out.ce_loss, out.aux_loss, 1.0
        else:
            ce_loss, aux_loss, aux_scale = shares
            loss = ce_loss + aux_loss
        if loss.requires_grad:  # else no trained parameter is in this micro-batch's graph: it adds no gradient
            self.manual_backward(loss / self.accumulate_grad_batches)
        for key, value in (("loss", loss), ("ce_loss", ce_loss), ("aux_loss", aux_loss)):
            value = value.detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._accumulate_routing(out, aux_scale)
        self._tokens += batch["input_ids"].numel()
        self._micro += 1
        if self._micro == self.accumulate_grad_batches:
            self._optimizer_step()
        return out.loss.detach()

    def _optimizer_step(self) -> None:
        assert self.train_optimizer is not None
        opt = self.optimizers()
        step = self.trainer.global_step  # steps completed before this one
        lr = lr_at(self.optim_cfg, step, self.total_steps)
        self.step_timer.mark("optimizer", self.device)
        with torch.profiler.record_function(OPTIMIZER_RANGE):  # profile.step's summary times this range
            grad_norm = self.train_optimizer.clip_grad_norm_(self.optim_cfg.max_grad_norm)
            opt.step(lr=lr)
            opt.zero_grad()
        self.step_timer.mark("end", self.device)
        if self.balancer.active:
            self.balancer.step()  # after the step, from the load of the whole step, as DeepSeek-V3 does
        n = self._micro
        done = step + 1
        # every rank trains an equal share of the step (the parallel sampler deals equal rows of one length):
        # the step's tokens are this rank's times the ranks, with no collective on the hot path
        ranks = self._ranks()
        tokens = self._tokens * ranks
        self.tokens_seen += tokens
        last = done >= self.total_steps or (self.trainer.max_steps > 0 and done >= self.trainer.max_steps)
        should_log = done % self.log_every_n_steps == 0 or last
        if should_log:
            self._reduce_logged(ranks)
        self.last_step = StepStats(
            step=done, loss=self._sums["loss"] / n, ce_loss=self._sums["ce_loss"] / n,
            aux_loss=self._sums["aux_loss"] / n, grad_norm=grad_norm.detach(), lr=lr, tokens=tokens,
            layer_aux_loss=self._sums["layer_aux_loss"] / n if "layer_aux_loss" in self._sums else None,
            should_log=should_log, total_tokens=self.tokens_seen,
        )
        self._micro, self._sums, self._tokens = 0, {}, 0

    def _ranks(self) -> int:
        """Processes training this model together (1 without an active parallel runtime)."""
        return torch.distributed.get_world_size() if self.parallel is not None and self.parallel.active else 1

    def _reduce_logged(self, ranks: int) -> None:
        """Turn this rank's loss sums and expert loads into the global batch's, on a logged step.

        One all-reduce of a few numbers per logged step (every rank logs the same steps, so every rank joins);
        the unlogged steps' loads are carried into it, so the heatmaps still count every step.
        """
        load, self._expert_load = self._expert_load, None
        if ranks > 1:
            keys = sorted(self._sums)
            flat = [self._sums[k].reshape(-1) for k in keys] + ([] if load is None else [load.reshape(-1).float()])
            summed = torch.cat(flat)
            torch.distributed.all_reduce(summed)
            parts = summed.split([t.numel() for t in flat])
            for key, part in zip(keys, parts, strict=False):
                self._sums[key] = part.reshape(self._sums[key].shape)
            if load is not None:
                load = parts[-1].reshape(load.shape).to(load.dtype)
        if load is not None:
            self._logged_load = load if self._logged_load is None else self._logged_load + load

    def _accumulate_routing(self, out: Any, aux_scale: float = 1.0) -> None:
        """Per-layer aux losses (times ``aux_scale``, this rank's share) and expert loads, summed on the device
        (read only when a logger asks)."""
        if not out.routings:
            return
        layer_aux = torch.stack([a.detach().float() for a in out.layer_aux_losses]) * aux_scale  # (M,)
        self._sums["layer_aux_loss"] = self._sums["layer_aux_loss"] + layer_aux if "layer_aux_loss" in self._sums \
            else layer_aux
        counts = torch.stack([r.counts for r in out.routings.values()])  # (M, E)
        self._expert_load = counts if self._expert_load is None else self._expert_load + counts

    def take_expert_load(self) -> Optional[torch.Tensor]:
        """(M, E) tokens routed to each expert of each MoE layer, all ranks, up to the last logged step and since
        the previous call (then reset); None if none.

        Summed over micro-batches, top-k slots and ranks; read by the metrics logger for load heatmaps and entropy.
        """
        load, self._logged_load = self._logged_load, None
        return load

    def step_metrics(self) -> dict[str, float]:
        """Extra numbers for the step's metrics line (read from the device only when a line is written)."""
        balance = {f"balance/{k}": v for k, v in self.balancer.stats().items()} if self.balancer.active else {}
        return balance | self.step_timer.figures()

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        n = batch["input_ids"].shape[0]
        # several processes each validate a shard: the logged figures are the mean over ranks, not rank 0's
        several = _world_size() > 1
        self.log("val_loss", out.loss, batch_size=n, prog_bar=True, sync_dist=several)
        self.log("val_ce_loss", out.ce_loss, batch_size=n, sync_dist=several)
        self.log("val_aux_loss", out.aux_loss, batch_size=n, sync_dist=several)
        if "labels" in batch:
            targets = (batch["labels"][:, 1:] != -100).sum()
            ce_sum = torch.where(targets > 0, out.ce_loss.detach().float() * targets, 0.0)  # no targets: ce is NaN
            self._val_ce = self._val_ce.to(ce_sum.device) + torch.stack([ce_sum, targets.float()])
        return out.loss

    def on_validation_epoch_end(self) -> None:
        # perplexity of the whole validation set (every rank's shard): exp of the token-weighted mean cross-entropy
        if _world_size() > 1:
            self._val_ce = self._val_ce.to(self.device)  # still the CPU zeros on a rank without validation batches
            torch.distributed.all_reduce(self._val_ce)
        total, targets = self._val_ce
        if targets > 0:
            self.log("val_ppl", torch.exp(total / targets))
        self._val_ce = torch.zeros(2)
