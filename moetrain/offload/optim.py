"""The sparse expert optimizer: dense parameters with torch AdamW, routed experts paged and stepped.

One optimizer step, in order (GPU; on the CPU the streams collapse into one and the logic is the same)::

    forward   observer(layer, routing): counts[layer] += routing.counts     (device, no sync)
              trace.record(): counts -> pinned host, non_blocking + event
              look-ahead: next router on this input -> predicted set         (device counters)
    backward  router grad of layer i accumulated -> trace.poll(i) -> swapper.prefetch(GPU share of i)
              (page-ins ride in_stream under the backward of layers i-1..0)
    clip      global norm over every .grad (dense + experts), coef stays a device tensor;
              dense grads *= coef, experts get grad_scale = 1/coef inside the fused kernel
    step      host reads the union of counts once  ─────────── the one sync of the step
              dense: torch AdamW (fused on CUDA)
              for layer L..0, chunks of num_slots/2 experts:
                  acquire(chunk)  (hits, or H2D on in_stream; compute waits on per-slot events)
                  prefetch(next chunk)                      ← overlaps the fused step below
                  _fused_adamw_ over the chunk; new weights -> model params (bf16 cast on GPU)
                  release(chunk): D2H on out_stream after an event  ← runs under the next chunk,
                                                                       and under the next forward
              step_on cpu/auto: the CPU share is stepped by DeepSpeed CPU Adam in host memory
              (gradients down, weights up, pipelined: :mod:`moetrain.offload.cpu_step`), in a thread
              beside the GPU share; the compute stream waits for its uploads before the next forward.

When steps wait for the end of backward: clipping by the global norm over all parameters needs every
gradient before any update, so with ``max_grad_norm > 0`` an exact step cannot start earlier; what
hides under backward is the page-in of state (unchanged until its step) and, under the next forward,
the page-out. Without clipping (``max_grad_norm == 0``) a layer's update depends on its own gradients
only, so when the training loop tells the engine the last micro-batch and the step's learning rate
(``begin_micro_batch(index, count, lr)``), the backward hook of layer i steps layer i as soon as its
gradients are final (one host read of that layer's counts), under the backward of layers i-1..0, frees
its GPU-path expert gradients (their squared norm is kept for the reported grad norm) and prefetches
layer i-1; ``step`` then does the dense parameters and whatever was not stepped yet.

Semantics: ``idle_experts: skip`` is torch AdamW with ``grad = None`` for experts that got no tokens.
``idle_experts: dense`` keeps the learning rate of every step; when an idle expert is next routed (the
observer sees it before the experts run) or when state is exported, the zero-gradient AdamW steps it
missed are replayed with the same kernel and each step's learning rate, so it equals a dense AdamW
stepping zero gradients. The replay needs the routed set on the host, so that mode reads the counts
once per MoE layer and micro-batch: the price of its exactness.

Compute weights stay resident by default (the model's own expert parameters). Their dtype is
``compute_dtype`` (bf16 on CUDA by default): the fp32 master lives in the store only, the experts' packed
(E, ...) weight tensors are rebuilt in bf16 once at construction, and every later write (new weights
after a step, a state load) copies into those packed views in place, so the grouped GEMM never repacks
or casts them. Their gradients are then bf16 too and are upcast chunk by chunk right before the fused
AdamW kernel. With ``resident_weights: no`` the compute weights live in host memory instead and are paged
in per layer and active expert (:mod:`moetrain.offload.weight_pager`); every write of new weights goes
to the pager's host rows, and the gradients stay on the device as before.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

import torch
import torch.nn as nn

from moetrain.offload.adam import CpuAdam, adamw
from moetrain.offload.config import OffloadConfig
from moetrain.offload.cpu_step import CpuStepper
from moetrain.offload.lookahead import Lookahead
from moetrain.offload.nvme import aligned_empty
from moetrain.offload.rates import Rates, measure, split
from moetrain.offload.routing_trace import RoutingTrace
from moetrain.offload.state_format import rounding_seed
from moetrain.offload.store import ExpertRecord, ExpertStore, Tier
from moetrain.offload.streams import event as _event
from moetrain.offload.swapper import Swapper
from moetrain.offload.weight_pager import ExpertWeightPager
from moetrain.optim import (
    CheckpointState,
    OptimizerConfig,
    SavedOptimizerState,
    TrainOptimizer,
    decays,
    global_grad_norm,
    param_groups,
)

PARTS = ("master", "exp_avg", "exp_avg_sq")


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
CPU_CHUNK_NUMEL = 1 << 25  # parameters per CPU-path chunk: 64 MiB of bf16 per pinned buffer, 4 of them


def compute_dtype(offload: OffloadConfig, device: torch.device) -> torch.dtype:
    """The routed experts' compute-weight dtype under ``offload.compute_dtype``."""
    if offload.compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if offload.compute_dtype == "bf16" else torch.float32


@torch.no_grad()
def cast_experts(model: nn.Module, dtype: torch.dtype) -> None:
    """Give every MoE block's routed experts weights of ``dtype``, packed: per projection one (E, ...)
    tensor whose slices become the parameters' ``.data`` (what ``RoutedExperts.packed_weights`` finds
    without repacking). The old storage is freed once no parameter points into it."""
    for block in model.moe_blocks():
        experts = block.experts
        for name in PROJECTIONS:
            params = [getattr(e, name).weight for e in experts if hasattr(e, name)]  # not other ranks' experts
            packed = torch.empty((len(params), *params[0].shape), dtype=dtype, device=params[0].device)
            for i, p in enumerate(params):
                packed[i].copy_(p.detach())
                p.data = packed[i]
        if hasattr(experts, "packed_weights"):
            assert all(w.dtype == dtype for w in experts.packed_weights())


class ExpertOffloadOptimizer(TrainOptimizer):
    """:class:`~moetrain.optim.TrainOptimizer` with routed experts' state in host memory or on NVMe.

    Args:
        model: a :class:`~moetrain.models.decoder.MoEForCausalLM` on its compute device.
        cfg: AdamW hyperparameters (shared by dense parameters and experts).
        offload: tiers, budgets and step path.
        owns: ``owns(layer, expert)``: hold state for these experts only (a data-parallel rank's share,
            see :mod:`moetrain.parallel`); None holds every expert.
        store: an expert store already holding the masters (a checkpoint streamed into the tiers by
            :func:`~moetrain.offload.staged_init.load_into_tiers`); None builds one from the model.
    """

    def __init__(self, model: nn.Module, cfg: OptimizerConfig, offload: OffloadConfig,
                 owns: Optional[Callable[[int, int], bool]] = None, store: Optional[ExpertStore] = None) -> None:
        if offload.resident_weights == "no" and owns is not None:
            raise ValueError("model.offload.resident_weights=no is for one process: with data or expert parallel "
                             "training keep resident_weights=auto")
        self.model, self.cfg, self.offload = model, cfg, offload
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        cuda = self.device.type == "cuda"
        expert_names = model.expert_parameter_names()
        dense_named = [(n, p) for n, p in model.named_parameters() if n not in expert_names]
        self.dense_params = [p for _, p in dense_named if p.requires_grad]
        self.dense = torch.optim.AdamW(param_groups(dense_named, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                       eps=cfg.eps, fused=True if cuda else None)
        self.store = store if store is not None else ExpertStore(model, offload, pin=cuda, owns=owns)
        for rec in self.store:
            if not all(decays(n, p) for n, p in zip(rec.names, rec.params, strict=True)):
                raise ValueError(f"{rec.prefix}: expert parameters are expected to be matrices (decayed)")
        self.by_name = self.store.by_name  # parameter name -> (record, index in the record)
        self.compressed = next(iter(self.store)).layout.compressed
        self.compute_dtype = compute_dtype(offload, self.device)
        self.pager: Optional[ExpertWeightPager] = None
        if offload.resident_weights == "no":  # the store took its fp32 master from the parameters first
            self.pager = self.store.pager  # staged init already moved them to host memory
            if self.pager is None:
                self.pager = ExpertWeightPager(model.moe_blocks(), self.device, self.compute_dtype)
        elif self.compute_dtype != next(iter(self.store)).params[0].dtype:
            cast_experts(model, self.compute_dtype)  # after the store took its fp32 master from them
        self.swapper = Swapper(self.store, self.device, self._num_slots())
        if offload.hot_cache_gb:
            self.swapper.grow_hot_cache(self._hot_capacity(offload.hot_cache_gb * 2**30))
        self.counts = {layer: torch.zeros(self.store.num_experts[layer], dtype=torch.int64, device=self.device)
                       for layer in self.store.layers}
        self.trace = RoutingTrace(self.device)
        self.lookahead = Lookahead(model, self.device) if offload.lookahead else None
        self.cpu_adam = CpuAdam(cfg) if offload.step_on != "gpu" else None
        self.cpu_stepper = None
        if self.cpu_adam is not None:
            total = sum(r.numel for r in self.store)
            chunk = max(min(CPU_CHUNK_NUMEL, total), max(r.numel for r in self.store))
            self.cpu_stepper = CpuStepper(self.cpu_adam, self.device, self.compute_dtype, chunk,
                                          mark_transfer=lambda stream: self.swapper.mark_transfer(stream),
                                          write_weights=None if self.pager is None else self._write_weights)
        # auto's cost model weighs the store's own format: its bytes on the link, its codec on the host
        sample = next(iter(self.store))
        self.rates: Rates = (measure(self.device, self.cpu_adam, self.compute_dtype, codec=sample.codec,
                                     state_bytes=sample.layout.nbytes / sample.numel)
                             if offload.step_on == "auto" else Rates())
        # on CUDA the CPU share runs in a thread beside the GPU share, whose launches are asynchronous
        both = cuda and self.cpu_adam is not None
        self.cpu_pool = ThreadPoolExecutor(1, thread_name_prefix="moetrain-cpu-adam") if both else None
        self.cpu_staging: Optional[torch.Tensor] = None
        self.cpu_io = None  # the CPU path's own NVMe channel, opened on first use
        self.lr_history: list[float] = []
        self.step_index = 0
        self._grad_scale: Optional[torch.Tensor] = None
        self._clip_coef: Optional[torch.Tensor] = None
        self._telemetry: dict[str, float] = {}
        self._timing: Optional[tuple] = None  # (step start, paging window start, end events) of the last step
        self._nvme_mark = self._nvme_bytes()  # swap-file byte counters at the end of the last step
        self._early_lr: Optional[float] = None  # set by begin_micro_batch: step layers under backward
        self._early_sq: Optional[torch.Tensor] = None  # squared norm of expert grads stepped (and freed) early
        self._stepped: dict[int, tuple[int, int]] = {}  # layer -> (experts stepped on GPU, on CPU) this step
        self._cpu_pending: list[Future] = []
        self._reader: Optional[ExpertOffloadOptimizer] = None  # the last background reader (checkpoint_state)
        self._closed = False
        self._hooks = [b.gate.weight.register_post_accumulate_grad_hook(self._make_backward_hook(b.layer_idx))
                       for b in model.moe_blocks()]
        model.attach_offload(weights=self.pager, routing=self)

    def _num_slots(self) -> int:
        slot_bytes = self.store.max_padded * 4
        n = int(self.offload.gpu_budget_gb * 2**30) // slot_bytes
        if n < 1:
            raise ValueError(f"model.offload.gpu_budget_gb={self.offload.gpu_budget_gb} holds no expert: one expert's "
                             f"state takes {slot_bytes / 2**20:.1f} MiB; raise the budget")
        if self.offload.gpu_slots is not None:
            n = min(n, self.offload.gpu_slots)
        return min(n, len(self.store.records))

    def _hot_capacity(self, nbytes: float) -> int:
        """Records whose state ``nbytes`` of device memory hold (at most all but the regular pool's)."""
        return max(0, min(int(nbytes // (self.store.max_padded * 4)), len(self.store.records) - self.swapper.num_slots))

    def _auto_hot_cache(self) -> None:
        """``hot_cache_gb: null``: after the first step, size the hot cache from the device memory that
        step left unused (its peak known now), keeping a margin of 10% of the device plus 1 GiB for
        allocator fragmentation; on a CPU stand-in device, a quarter of the available host memory."""
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            spare = total - torch.cuda.max_memory_reserved(self.device) - 0.1 * total - 2**30
        else:
            import psutil

            spare = psutil.virtual_memory().available / 4
        self.swapper.grow_hot_cache(self._hot_capacity(max(0.0, spare)))

    # ------------------------------------------------------------------ hooks on the model
    def routed(self, layer: int, routing, hidden: torch.Tensor) -> None:
        counts = routing.counts
        if self.offload.idle_experts == "dense" and self.step_index > 0:
            routed = torch.nonzero(counts).flatten().tolist()  # host read: the price of exact catch-up
            self._catch_up([self.store.records[(layer, e)] for e in routed])
        if not torch.is_grad_enabled():
            return  # evaluation: nothing will be stepped
        self.add_routed_counts(layer, counts)
        if self.offload.prefetch:
            self.trace.record(layer, counts)
        if self.lookahead is not None:
            self.lookahead.observe(layer, counts, hidden)

    def _make_backward_hook(self, layer: int):
        """Runs when the router weight's gradient of ``layer`` is accumulated, i.e. backward is done with
        the layer (its experts' gradients come before the router's in backward)."""
        index = self.store.layers.index(layer)

        def hook(_param: torch.Tensor) -> None:
            if self._early_lr is not None:
                # last micro-batch, no clipping: this layer's gradients are final, step it now. Its counts
                # come from the host copies recorded in forward (no device sync), else one read per layer.
                counts = self.trace.host_counts(layer) if self.offload.prefetch else None
                if counts is None:
                    counts = self.counts[layer].cpu()
                self._step_layer(index, counts, self._early_lr, early=True)
                if index > 0:
                    self._prefetch_layer(self.store.layers[index - 1])  # next to be stepped
            else:
                self._prefetch_layer(layer)
        return hook

    def _prefetch_layer(self, layer: int) -> None:
        """Page in the state of ``layer``'s experts routed so far, the share the step will run on the GPU."""
        if not self.offload.prefetch:
            return
        seen = self.trace.poll(layer)
        if seen is not None:
            gpu_recs, _ = self._split([r for r in self.store.layer_records(layer) if seen[r.expert]])
            self.swapper.prefetch(gpu_recs)

    # ------------------------------------------------------------------ TrainOptimizer
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global norm over every gradient (no state is paged); dense grads scaled now, experts in-kernel."""
        if self.offload.idle_experts == "dense":
            norm = self._dense_view_norm()
        else:
            norm = global_grad_norm(self.params)
        if self._early_sq is not None:  # layers stepped under backward freed (some of) their grads
            norm = torch.sqrt(norm.to(self.device).square() + self._early_sq)
        self._grad_scale = self._clip_coef = None
        if max_norm > 0 and self._stepped:
            raise ValueError("clip_grad_norm_ with max_norm > 0 after layers were stepped during backward: "
                             "the optimizer config's max_grad_norm must match the one passed here")
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in self.dense_params:
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
            self._clip_coef = coef
            self._grad_scale = (1.0 / coef).to(self.device, torch.float32)
        return norm

    def _dense_view_norm(self) -> torch.Tensor:
        """The global norm as a dense AdamW sees it: idle experts contribute zero-gradient entries.

        Equal in value to :func:`global_grad_norm`, and also in rounding to the reference that keeps
        zero gradients (the reduction's length is the same).
        """
        zero = torch.zeros((), device=self.device)
        expert_params = {id(p) for rec in self.store for p in rec.params}
        norms = [torch.linalg.vector_norm(p.grad.float()) if p.grad is not None else zero
                 for p in self.params if p.grad is not None or id(p) in expert_params]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else zero

    def begin_micro_batch(self, index: int, count: int, lr: Optional[float] = None) -> None:
        """Micro-batch ``index`` of ``count`` of the coming optimizer step is about to run forward.

        With ``lr`` (the learning rate the coming :meth:`step` will take) on the last micro-batch and
        no global-norm clipping (``max_grad_norm == 0``), each MoE layer's experts are stepped as soon as
        backward has finished that layer, under the backward of the layers below it.
        """
        last = index == count - 1
        # The CPU share steps under backward too: its gradient copies wait for the compute stream's event
        # and its uploads are fenced before the next forward (tests/gpu, fp32 compute, to 1e-6).
        self._early_lr = lr if last and lr is not None and self.cfg.max_grad_norm == 0 else None

    def steps_during_backward(self) -> bool:
        """Whether this backward steps each MoE layer's experts as it finishes the layer (see
        :meth:`begin_micro_batch`): their records change before :meth:`step`."""
        return self._early_lr is not None

    def add_routed_counts(self, layer: int, counts: torch.Tensor) -> None:
        """(E,) more routed tokens of ``layer`` this step: the experts the sum calls active are stepped."""
        self.counts[layer] += counts

    @torch.no_grad()
    def _step_layer(self, i: int, counts: torch.Tensor, lr: float, early: bool = False) -> None:
        """Step MoE layer ``store.layers[i]``'s routed experts (``counts``: its (E,) host counts).

        The GPU share is issued here; the CPU share runs in the CPU thread (CUDA) and is collected by
        :meth:`_finish_cpu`. ``early`` (under backward): the GPU share's gradients are freed right after
        its step, their squared norm kept for :meth:`clip_grad_norm_` (the CPU share's are still being
        copied down by the CPU thread; they stay until ``zero_grad``).
        """
        layer = self.store.layers[i]
        recs = [r for r in self.store.layer_records(layer)
                if counts[r.expert] > 0 and any(p.grad is not None for p in r.params)]
        for rec in self.store.layer_records(layer):
            rec.frequency = 0.5 * rec.frequency + float(counts[rec.expert])
        self._catch_up(recs)
        gpu_recs, cpu_recs = self._split(recs)
        if cpu_recs:
            self.swapper.settle(cpu_recs)  # here, not in the CPU thread: the swapper is not shared
            ready = _event(self.device)  # the CPU path's gradient copies wait for the compute stream
            if ready is not None:
                ready.record()
            args = (cpu_recs, [r.step + 1 for r in cpu_recs], lr, ready, self._clip_coef)
            if self.cpu_pool is not None:
                self._cpu_pending.append(self.cpu_pool.submit(self._step_cpu, *args))
            else:
                self._step_cpu(*args)
        if early:
            grads = [p.grad for rec in gpu_recs for p in rec.params if p.grad is not None]  # the ones freed below
            if grads:
                sq = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).square().sum()
                self._early_sq = sq if self._early_sq is None else self._early_sq + sq
        self._step_gpu(gpu_recs, lr)
        if early:
            # the fused step was queued on this stream: memory freed here is reused only after it ran
            for rec in gpu_recs:
                for p in rec.params:
                    p.grad = None
        for rec in recs:
            rec.step += 1
            rec.synced_to = self.step_index + 1
        self._stepped[layer] = (len(gpu_recs), len(cpu_recs))

    def _finish_cpu(self) -> None:
        """Wait for the CPU thread; the compute stream then waits for its weight uploads (no host sync)."""
        for pending in self._cpu_pending:
            pending.result()
        self._cpu_pending.clear()
        if self.cpu_stepper is not None:
            self.cpu_stepper.fence()

    @torch.no_grad()
    def step(self, lr: float) -> None:
        t0 = time.perf_counter()
        start = _event(self.device, timing=True)
        if start is not None:
            start.record()
        if self._stepped and lr != self._early_lr:
            raise ValueError(f"step(lr={lr}) after layers were stepped during backward with lr={self._early_lr}: "
                             "pass begin_micro_batch the learning rate the step takes")
        counts = torch.stack([self.counts[layer] for layer in self.store.layers]).cpu()  # the step's one sync
        for group in self.dense.param_groups:
            group["lr"] = lr
        self.dense.step()
        self.lr_history.append(lr)
        early_layers = set(self._stepped)
        for i in reversed(range(len(self.store.layers))):
            if self.store.layers[i] not in self._stepped:  # not already stepped under backward
                self._step_layer(i, counts[i], lr)
        self._finish_cpu()
        on_gpu = sum(g for g, _ in self._stepped.values())
        on_cpu = sum(c for _, c in self._stepped.values())
        self._stepped.clear()
        self._early_lr = self._early_sq = None
        self.swapper.unreserve()
        self.swapper.revise_hot()
        self.swapper.drain_writes()
        self.step_index += 1
        if self.step_index == 1 and self.offload.hot_cache_gb is None:
            self._auto_hot_cache()
        for c in self.counts.values():
            c.zero_()
        self.trace.reset()
        self._grad_scale = self._clip_coef = None  # a step without clip_grad_norm_ must not reuse this one's
        self._record_telemetry(counts, on_gpu, on_cpu, time.perf_counter() - t0, self._nvme_mark, start)
        self._telemetry["offload/layers_stepped_in_backward"] = float(len(early_layers))
        self._nvme_mark = self._nvme_bytes()
        self.swapper.reset_stats()  # the next step's counters include the page-ins its backward starts

    def zero_grad(self) -> None:
        self.dense.zero_grad(set_to_none=True)
        for rec in self.store:
            for p in rec.params:
                p.grad = None

    # ------------------------------------------------------------------ the two step paths
    def _split(self, recs: list[ExpertRecord]) -> tuple[list[ExpertRecord], list[ExpertRecord]]:
        if self.offload.step_on == "gpu" or not recs:
            return recs, []
        hot = [r for r in recs if r.key in self.swapper.hot]  # resident: stepped where they are
        recs = [r for r in recs if r.key not in self.swapper.hot]
        gpu, cpu = self._split_cold(recs)
        return hot + gpu, cpu

    def _split_cold(self, recs: list[ExpertRecord]) -> tuple[list[ExpertRecord], list[ExpertRecord]]:
        if not recs:
            return [], []
        if self.offload.step_on == "cpu":
            return [], recs
        weight_bytes = recs[0].params[0].element_size()
        gpu_idx, cpu_idx = split([r.numel for r in recs], self.rates, weight_bytes, weight_bytes)
        return [recs[i] for i in gpu_idx], [recs[i] for i in cpu_idx]

    def _chunks(self, recs: list[ExpertRecord]) -> list[list[ExpertRecord]]:
        size = max(1, self.swapper.num_slots // 2)  # half the slots compute while the other half fills
        return [recs[i:i + size] for i in range(0, len(recs), size)]

    def _step_gpu(self, recs: list[ExpertRecord], lr: float) -> None:
        chunks = self._chunks(recs)
        for c, chunk in enumerate(chunks):
            flats = self.swapper.acquire(chunk)
            if c + 1 < len(chunks):
                self.swapper.prefetch(chunks[c + 1])
            for group in self._scratch_groups(list(zip(chunk, flats, strict=True))):
                ps, gs, ms, vs, steps, decoded = [], [], [], [], [], []
                for rec, flat in group:
                    master, exp_avg, exp_avg_sq = rec.parts(flat)
                    decoded.append((rec, flat, master, exp_avg, exp_avg_sq))
                    views = zip(rec.params, rec.split(master), rec.split(exp_avg), rec.split(exp_avg_sq), strict=True)
                    for p, w, m, v in views:
                        ps.append(w)
                        gs.append(p.grad if p.grad is not None else torch.zeros_like(p))
                        ms.append(m)
                        vs.append(v)
                        steps.append(rec.step + 1)
                adamw(ps, gs, ms, vs, steps, lr, self.cfg.weight_decay, self.cfg, clip_coef=self._clip_coef,
                      grad_scale=self._grad_scale)
                for rec, flat, master, exp_avg, exp_avg_sq in decoded:
                    self._store_stepped(rec, flat, master, exp_avg, exp_avg_sq, rec.step + 1)
            self.swapper.release(chunk)

    def _scratch_groups(self, pairs: list[tuple[ExpertRecord, torch.Tensor]]) -> list[list]:
        """Records stepped by one fused call. fp32 state is stepped in place in its slots: the whole
        chunk at once. Compressed state is decoded into fp32 scratch (12 bytes a parameter) and encoded
        back: groups whose scratch stays within a quarter of ``gpu_budget_gb`` (at least one record)."""
        if not self.compressed:
            return [pairs]
        limit = self.offload.gpu_budget_gb * 2**30 / 4
        groups: list[list] = []
        size = 0.0
        for pair in pairs:
            scratch = 12.0 * pair[0].numel
            if not groups or size + scratch > limit:
                groups.append([])
                size = 0.0
            groups[-1].append(pair)
            size += scratch
        return groups

    def _store_stepped(self, rec: ExpertRecord, flat: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor,
                       exp_avg_sq: torch.Tensor, step: int) -> None:
        """Encode a stepped record's fp32 state into its format (nothing to do for fp32) and write the new
        compute weights (``step``: the record's AdamW step number after this update)."""
        generator = rec.codec.record_generator(flat.device, rounding_seed(rec.layer, rec.expert, step))
        rec.codec.encode(flat, master, exp_avg, exp_avg_sq, generator)
        self._write_weights(rec, rec.codec.compute_weights(flat, master))

    def _host_state(self, rec: ExpertRecord) -> torch.Tensor:
        """The record's flat state in host memory (NVMe records are read into a staging buffer through
        the CPU path's own I/O channel, so that it may run in a thread beside the swapper)."""
        if rec.tier is Tier.CPU:
            return self.store.host_view(rec)
        if self.cpu_staging is None:
            self.cpu_staging = aligned_empty(self.store.max_padded, self.store.pin)
            self.cpu_io = self.store.swap.channel()
        buf = self.cpu_staging[:rec.padded]
        self.cpu_io.submit_read(buf, rec.offset)
        self.cpu_io.wait_reads()
        return buf

    def _put_host_state(self, rec: ExpertRecord, flat: torch.Tensor) -> None:
        if rec.tier is Tier.NVME:
            self.cpu_io.submit_write(flat, rec.offset)
            self.cpu_io.wait_writes()

    def _step_cpu(self, recs: list[ExpertRecord], steps: list[int], lr: float, ready: Optional[torch.cuda.Event],
                  clip_coef: Optional[torch.Tensor]) -> None:
        """DeepSpeed CPU Adam over ``recs`` in host memory (see :mod:`moetrain.offload.cpu_step`); ``steps``:
        their step numbers after this update (read when queued: ``rec.step`` moves on meanwhile)."""
        if not recs:
            return
        coef = None if clip_coef is None else clip_coef.cpu()
        self.cpu_stepper.step(recs, steps, lr, self.cfg.weight_decay, coef, ready, self._host_state,
                              self._put_host_state)

    def _write_weights(self, rec: ExpertRecord, master: torch.Tensor, non_blocking: bool = True) -> None:
        """The record's compute weights become ``master`` ((n,) in record order, any dtype)."""
        if self.pager is not None:
            self.pager.write(rec.layer, rec.expert, master)
            return
        for p, w in zip(rec.params, rec.split(master), strict=True):
            p.data.copy_(w, non_blocking=non_blocking)

    # ------------------------------------------------------------------ idle_experts: dense
    @torch.no_grad()
    def _catch_up(self, recs: list[ExpertRecord]) -> None:
        """Replay the zero-gradient AdamW steps that ``recs`` missed (``idle_experts: dense`` only)."""
        if self.offload.idle_experts != "dense":
            return
        late = [r for r in recs if r.synced_to < self.step_index]
        for chunk in self._chunks(late):
            flats = self.swapper.acquire(chunk)
            for s in range(min(r.synced_to for r in chunk), self.step_index):
                ps, ms, vs, steps = [], [], [], []
                decoded = []
                for rec, flat in zip(chunk, flats, strict=True):
                    if rec.synced_to > s:
                        continue
                    master, exp_avg, exp_avg_sq = rec.parts(flat)
                    decoded.append((rec, flat, master, exp_avg, exp_avg_sq))
                    ps += rec.split(master)
                    ms += rec.split(exp_avg)
                    vs += rec.split(exp_avg_sq)
                    steps += [rec.step + 1] * len(rec.params)
                    rec.step += 1
                    rec.synced_to = s + 1
                gs = [torch.zeros_like(p) for p in ps]
                adamw(ps, gs, ms, vs, steps, self.lr_history[s], self.cfg.weight_decay, self.cfg)
                for rec, flat, master, exp_avg, exp_avg_sq in decoded:
                    self._store_stepped(rec, flat, master, exp_avg, exp_avg_sq, rec.step)
            self.swapper.release(chunk)

    def finalize(self) -> None:
        """Apply every deferred catch-up and land every page-out: the model and the store are current."""
        self._catch_up(list(self.store))
        self.swapper.flush()

    # ------------------------------------------------------------------ telemetry
    def _nvme_bytes(self) -> tuple[int, int]:
        """Bytes read/written on the swap file so far (all channels)."""
        swap = self.store.swap
        return (0, 0) if swap is None else (swap.bytes_read, swap.bytes_written)

    def _record_telemetry(self, counts: torch.Tensor, on_gpu: int, on_cpu: int, seconds: float,
                          nvme0: tuple[int, int], start: Optional[torch.cuda.Event]) -> None:
        """Counters of the step; on CUDA its times are events, resolved when :meth:`telemetry` is read."""
        st = self.swapper.stats
        nvme1 = self._nvme_bytes()
        t: dict[str, float] = {
            "offload/h2d_bytes": float(st.h2d_bytes), "offload/d2h_bytes": float(st.d2h_bytes),
            "offload/nvme_read_bytes": float(nvme1[0] - nvme0[0]),
            "offload/nvme_write_bytes": float(nvme1[1] - nvme0[1]),
            "offload/step_s": seconds, "offload/page_window_s": seconds, "offload/stall_s": st.stall_s,
            "offload/cache_hit_rate": st.hits / (st.hits + st.misses) if st.hits + st.misses else 0.0,
            "offload/prefetched": float(st.prefetched),
            "offload/experts_stepped_gpu": float(on_gpu), "offload/experts_stepped_cpu": float(on_cpu),
            "offload/gpu_state_bytes": float(self.swapper.device_bytes),
            "offload/hot_experts": float(len(self.swapper.hot)),
            "offload/hot_cache_slots": float(self.swapper.hot_capacity),
            "offload/rate_h2d_gbps": self.rates.h2d_gbps, "offload/rate_d2h_gbps": self.rates.d2h_gbps,
            "offload/rate_duplex_gbps": self.rates.duplex_gbps,
            "offload/rate_cpu_adam_gparams": self.rates.cpu_adam_gparams,
        }
        if self.pager is not None:  # paged compute weights: their own traffic, forward and backward included
            ps = self.pager.reset_stats()
            rows = ps.row_hits + ps.row_misses
            t.update({"offload/weights_h2d_bytes": float(ps.h2d_bytes),
                      "offload/weights_d2h_bytes": float(ps.d2h_bytes),
                      "offload/weights_hit_rate": ps.row_hits / rows if rows else 0.0,
                      "offload/weights_prefetched_rows": float(ps.prefetched_rows),
                      "offload/weights_device_bytes": float(self.pager.device_bytes)})
        if self.lookahead is not None:
            t["offload/lookahead_precision"], t["offload/lookahead_recall"] = self.lookahead.read()
        active = counts > 0
        for i, layer in enumerate(self.store.layers):
            t[f"offload/active_experts/layer{layer}"] = float(active[i].sum())
        used = counts[active].float()
        t["offload/tokens_per_expert_mean"] = float(used.mean()) if used.numel() else 0.0
        t["offload/tokens_per_expert_max"] = float(used.max()) if used.numel() else 0.0
        self._telemetry = t
        self._timing = None
        if start is not None:  # end marks on every stream the step queued work on; read lazily
            streams = [torch.cuda.current_stream(self.device), *self.swapper.transfer_streams()]
            if self.cpu_stepper is not None:
                streams += self.cpu_stepper.transfer_streams()
            ends = []
            for stream in streams:
                ends.append(torch.cuda.Event(enable_timing=True))
                ends[-1].record(stream)
            self._timing = (start, st.window_start, ends)

    def _resolve_timing(self) -> None:
        """Replace host-time figures by CUDA-event ones (waits for the step's last events: called only
        when telemetry is read, never on the training path)."""
        if self._timing is None:
            t = self._telemetry
            if t:
                t["offload/link_gbps"] = ((t["offload/h2d_bytes"] + t["offload/d2h_bytes"]) / t["offload/page_window_s"]
                                          / 1e9 if t["offload/page_window_s"] > 0 else 0.0)
            return
        start, window_start, ends = self._timing
        self._timing = None
        for e in ends:
            e.synchronize()
        t = self._telemetry
        t["offload/step_s"] = max(start.elapsed_time(e) for e in ends) / 1e3
        window = max(window_start.elapsed_time(e) for e in ends) / 1e3 if window_start is not None else 0.0
        t["offload/page_window_s"] = window
        moved = t["offload/h2d_bytes"] + t["offload/d2h_bytes"]
        t["offload/link_gbps"] = moved / window / 1e9 if window > 0 else 0.0

    def telemetry(self) -> dict[str, float]:
        """Figures of the last optimizer step (flat; the training loop writes them to metrics.jsonl).

        ``step_s``: from the start of :meth:`step` to the end of the last work it queued on any stream;
        ``page_window_s``: from the first transfer of the step (backward prefetch included) to the end
        of the last; ``link_gbps``: (h2d + d2h bytes) / ``page_window_s``. On CUDA these come from
        events, and reading them waits for the step's work to finish.
        """
        self._resolve_timing()
        return dict(self._telemetry)

    # ------------------------------------------------------------------ routing frequency (eviction order)
    def routing_frequency(self) -> dict[int, list[float]]:
        freq: dict[int, list[float]] = {}
        for rec in self.store:
            freq.setdefault(rec.layer, []).append(float(rec.frequency))
        return freq

    def load_routing_frequency(self, frequency: dict[int, list[float]]) -> None:
        for rec in self.store:
            values = frequency.get(rec.layer)
            if values is not None and rec.expert < len(values):
                rec.frequency = float(values[rec.expert])

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, *, background: bool = False) -> CheckpointState:
        """The dense AdamW, the learning-rate history and every expert's step count, after :meth:`finalize`;
        the experts' masters and moments stream from the store, one record at a time.

        ``background``: the streams read the records through :meth:`_background_reader`, never through the
        swapper, whose streams and I/O channel stay the training thread's.
        """
        steps = self.expert_steps()  # finalizes first: catch-up applied, page-outs landed
        source = self._background_reader() if background else self
        return CheckpointState(self.dense, list(self.lr_history), steps, source.named_master_tensors,
                               source.named_optimizer_tensors)

    def _background_reader(self) -> ExpertOffloadOptimizer:
        """A shallow copy of this optimizer (made anew for each save, so it sees the current attributes) that
        reads the records for a writer thread: its ``finalize`` is a no-op (it ran on the training thread when
        the state was taken), and its staging buffer and swap-file channel are its own, made on first use and
        kept for the next saves of the same store."""
        previous = self._reader
        reader = copy.copy(self)
        reader._reader = None
        reader.finalize = lambda: None  # type: ignore[method-assign]
        same_store = previous is not None and previous.store is self.store
        reader.cpu_staging = previous.cpu_staging if same_store else None
        reader.cpu_io = previous.cpu_io if same_store else None
        self._reader = reader
        return reader

    def load_checkpoint_state(self, saved: SavedOptimizerState) -> None:
        """The dense AdamW's moments, then the counters (every expert this optimizer holds: its saved step count,
        0 without state), then the experts' moments in their stored format."""
        saved.load_into(self.dense)
        names = sorted(self.by_name)
        steps = {name: saved.steps.get(name, 0) for name in names}
        self.load_state_dict({"dense": self.dense.state_dict(), "expert_steps": steps, "lr_history": saved.lr_history,
                              "step_index": saved.step_index})
        self.load_expert_tensors(saved.tensors(names))

    # ------------------------------------------------------------------ state export / import
    def _each_state(self) -> Iterator[tuple[ExpertRecord, torch.Tensor]]:
        """Every record's current flat state in host memory, one record at a time (NVMe paged through)."""
        self.finalize()
        for rec in self.store:
            yield rec, self._host_state(rec)

    def named_master_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(parameter name, fp32 master weight) of every expert parameter; tensors are fresh copies."""
        for rec, flat in self._each_state():
            for name, w in zip(rec.names, rec.split(rec.parts(flat)[0]), strict=True):
                yield name, w.clone()

    def named_optimizer_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(``{name}.exp_avg`` / ``{name}.exp_avg_sq``, tensor) of every expert parameter, in the stored
        format: fp32, bf16, or uint8 codes followed by their per-block scales ``{name}.exp_avg.absmax``."""
        for rec, flat in self._each_state():
            views = rec.layout.views(flat)
            for which, scale in (("exp_avg", "m_scale"), ("exp_avg_sq", "v_scale")):
                for name, part in zip(rec.names, rec.split(views[which]), strict=True):
                    yield f"{name}.{which}", part.clone()
                if rec.layout.moments == "int8":
                    for name, (_, blocks) in zip(rec.names, rec.codec.param_slices(), strict=True):
                        yield f"{name}.{which}.absmax", views[scale][blocks].clone()

    def expert_steps(self) -> dict[str, int]:
        """AdamW step count per expert parameter name (torch's per-parameter ``state['step']``)."""
        self.finalize()
        return {name: rec.step for rec in self.store for name in rec.names}

    @torch.no_grad()
    def load_expert_tensors(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load tensors named as :meth:`named_master_tensors` / :meth:`named_optimizer_tensors` yield them.

        A master tensor also becomes the model's compute weight. fp32 moments load into any moment
        format (quantized or rounded here); stored bf16 / int8 moments load into the same format. Any
        order; NVMe records are read-modified-written one tensor at a time.
        """
        self.swapper.flush()
        for name, tensor in named:
            which, absmax = "master", name.endswith(".absmax")
            if absmax:
                name = name[: -len(".absmax")]
            for suffix in PARTS[1:]:
                if name.endswith("." + suffix):
                    name, which = name[: -len(suffix) - 1], suffix
            if name not in self.by_name:
                raise KeyError(f"{name!r} is not an expert parameter of this model")
            rec, idx = self.by_name[name]
            self.swapper.invalidate(rec)
            flat = self._host_state(rec)
            elems, blocks = rec.codec.param_slices()[idx]
            views = rec.layout.views(flat)
            label = name if which == "master" else f"{name}.{which}"
            if absmax:
                if rec.layout.moments != "int8":
                    raise ValueError(f"{label}.absmax: the checkpoint holds 8-bit moments; resume with "
                                     "model.offload.moments=int8 (or from a checkpoint with fp32 moments)")
                self._copy_checked(views["m_scale" if which == "exp_avg" else "v_scale"][blocks], tensor, label)
            elif which == "master":
                master = rec.codec.decode_master(flat)
                if master.data_ptr() == views["master"].data_ptr():  # fp32: a view, written in place
                    master = master.clone()
                self._copy_checked(master[elems].view(rec.shapes[idx]), tensor, label)
                rec.codec.encode_master(flat, master)
                weights = rec.codec.compute_weights(flat, master)
                if self.pager is not None:  # this parameter's part of the row
                    self.pager.write(rec.layer, rec.expert, weights[elems], start=elems.start)
                else:
                    rec.params[idx].data.copy_(weights[elems].view(rec.shapes[idx]))
            elif tensor.dtype == views[which].dtype:  # the stored format itself: copied as is
                self._copy_checked(views[which][elems].view(rec.shapes[idx]), tensor, label)
            elif tensor.dtype == torch.uint8:
                raise ValueError(f"{label}: the checkpoint holds 8-bit moments; resume with "
                                 "model.offload.moments=int8 (or from a checkpoint with fp32 moments)")
            else:  # e.g. fp32 moments into bf16 or int8 ones: decode, replace this parameter's part, encode
                value = rec.codec.decode_moment(flat, which).clone()
                self._copy_checked(value[elems].view(rec.shapes[idx]), tensor.float(), label)
                rec.codec.encode_moment(flat, which, value)
            self._put_host_state(rec, flat)

    @staticmethod
    def _copy_checked(dst: torch.Tensor, src: torch.Tensor, label: str) -> None:
        if dst.shape != src.shape:
            raise ValueError(f"{label}: shape {tuple(src.shape)} != {tuple(dst.shape)}")
        dst.copy_(src)

    def state_dict(self, include_expert_tensors: bool = True) -> dict[str, Any]:
        """Dense AdamW state and the experts' step counters; with ``include_expert_tensors`` also every
        expert's master weights and moments (checkpoint writers stream those through the named_* methods)."""
        state: dict[str, Any] = {
            "dense": self.dense.state_dict(),
            "expert_steps": self.expert_steps(),
            "lr_history": list(self.lr_history),
            "step_index": self.step_index,
        }
        if include_expert_tensors:
            state["expert_tensors"] = dict(self.named_master_tensors()) | dict(self.named_optimizer_tensors())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dense.load_state_dict(state["dense"])
        self.lr_history = list(state["lr_history"])
        self.step_index = int(state["step_index"])
        for name, step in state["expert_steps"].items():
            rec, _ = self.by_name[name]
            rec.step = int(step)
            rec.synced_to = self.step_index  # exported state was caught up to its step
        if "expert_tensors" in state:
            self.load_expert_tensors(state["expert_tensors"].items())

    def close(self) -> None:
        """Remove hooks, stop the CPU step thread and delete the swap file. Idempotent: the training module
        closes the engine when fit ends and the CLI once more on its way out, error or not; the swap file is
        deleted even when finishing the pending transfers fails (a CUDA error, Ctrl-C)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.model.detach_routing()
            for h in self._hooks:
                h.remove()
            if self.cpu_pool is not None:
                self.cpu_pool.shutdown(wait=True)
            self.swapper.flush()
        finally:
            self.store.close()
