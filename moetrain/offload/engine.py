"""The expert engine: routed experts' state stepped where the schedule says, by parts handed to it.

The engine only wires parts (each built and tested on its own; :mod:`moetrain.offload.build` assembles them)::

    routing sink    routed() <- the model, before a layer's experts run: counts, trace, look-ahead, catch-up
    schedule        begin_micro_batch / backward hook: step a layer under backward or prefetch it
                    (the rule: :func:`moetrain.offload.schedule.steps_under_backward`)
    split           GPU share / CPU share of a layer's active experts (rates.split_records)
    GPU step        gpu_step.GpuStep: slots, fused AdamW, new weights
    CPU step        cpu_step.CpuShare: AdamW on host state (adam_cuda_order), in a thread beside the GPU share
    catch-up        catch_up.CatchUp: idle_experts=dense's replay of missed zero-gradient steps
    telemetry       telemetry.StepTelemetry: the step's figures
    state I/O       state_io.ExpertStateIO: named tensors out (checkpoints) and in (loads)

The dense parameters are not the engine's: :class:`~moetrain.offload.composite.CompositeOptimizer` joins the
dense AdamW and this engine into one :class:`~moetrain.optim.TrainOptimizer`. See ``offload/README.md`` for the
order of one step.
"""

from __future__ import annotations

from typing import Optional

import torch

from moetrain.offload import schedule
from moetrain.offload.auto_split import AutoSplit
from moetrain.offload.catch_up import CatchUp
from moetrain.offload.config import OffloadPlan
from moetrain.offload.cpu_step import CpuShare
from moetrain.offload.gpu_step import GpuStep
from moetrain.offload.hot_cache_margin import HOT_CACHE_MARGIN_BYTES, HOT_CACHE_MARGIN_SHARE
from moetrain.offload.lookahead import Lookahead
from moetrain.offload.rates import Rates, split_records
from moetrain.offload.routing_trace import RoutingTrace
from moetrain.offload.state_io import ExpertStateIO
from moetrain.offload.store import ExpertStore
from moetrain.offload.swapper import Swapper
from moetrain.offload.telemetry import StepTelemetry
from moetrain.offload.weight_masters import step_reads_weights
from moetrain.optim import OptimizerConfig


class ExpertEngine:
    """Steps the routed experts whose state ``store`` holds; every collaborator is an argument."""

    def __init__(self, *, cfg: OptimizerConfig, offload: OffloadPlan, store: ExpertStore, swapper: Swapper,
                 gpu: GpuStep, cpu: Optional[CpuShare], catch_up: CatchUp, telemetry: StepTelemetry,
                 state_io: ExpertStateIO, trace: RoutingTrace, rates: Rates,
                 lookahead: Optional[Lookahead] = None) -> None:
        self.cfg, self.offload, self.store, self.swapper = cfg, offload, store, swapper
        self.gpu, self.cpu, self.catch_up, self.telemetry, self.state_io = gpu, cpu, catch_up, telemetry, state_io
        self.trace, self.rates, self.lookahead = trace, rates, lookahead
        self.device = swapper.device
        self.counts = {layer: torch.zeros(store.num_experts[layer], dtype=torch.int64, device=self.device)
                       for layer in store.layers}
        self.lr_history: list[float] = []
        self.step_index = 0
        self.clip_coef: Optional[torch.Tensor] = None  # device scalars of this step's global-norm clipping
        self.grad_scale: Optional[torch.Tensor] = None
        self.early_lr: Optional[float] = None  # set by begin_micro_batch: step layers under backward
        self.micro_index = 0  # the micro-batch begin_micro_batch announced (0 when nobody announces them)
        self.early_sq: Optional[torch.Tensor] = None  # squared norm of expert grads stepped (and freed) early
        self.stepped: dict[int, tuple[int, int]] = {}  # layer -> (experts stepped on GPU, on CPU) this step
        self._counts_host: Optional[torch.Tensor] = None
        self.counts_beyond_trace = False  # add_routed_counts brought counts the routing trace has not seen
        self.auto = AutoSplit(offload.step_on, self.device)  # step_on auto: the split, or all on the GPU if faster

    # ------------------------------------------------------------------ routing sink (the model calls it)
    def routed(self, layer: int, routing, hidden: torch.Tensor) -> None:
        counts = routing.counts
        if self.catch_up.enabled and self.step_index > 0:
            routed = torch.nonzero(counts).flatten().tolist()  # host read: the price of exact catch-up
            records = self.store.records  # frozen experts (and other ranks') have none: nothing to catch up
            self.catch_up.run([records[(layer, e)] for e in routed if (layer, e) in records], self.step_index,
                              self.lr_history)
        if not torch.is_grad_enabled():
            return  # evaluation: nothing will be stepped
        self.counts[layer] += counts
        if self.offload.prefetch:
            self.trace.record(layer, counts)
        if self.lookahead is not None and self.micro_index == 0:
            # telemetry only (prefetch follows the trace): the first micro-batch of a step is its sample, so the
            # other micro-batches' forwards launch none of its dozen small kernels a layer
            self.lookahead.observe(layer, counts, hidden)

    def add_routed_counts(self, layer: int, counts: torch.Tensor) -> None:
        """(E,) more routed tokens of ``layer`` this step from outside the routing sink (the multi-rank wrapper
        adds the other ranks'): the experts the sum calls active are stepped."""
        self.counts[layer] += counts
        self.counts_beyond_trace = True

    # ------------------------------------------------------------------ schedule
    def begin_micro_batch(self, index: int, count: int, lr: Optional[float] = None) -> None:
        """Micro-batch ``index`` of ``count`` is about to run forward; ``lr``: the coming step's learning rate."""
        self.micro_index = index
        if index == 0:
            self.auto.step_started()
        under = lr is not None and schedule.steps_under_backward(self.cfg, micro_batch=index, micro_batches=count)
        self.early_lr = lr if under else None

    def backward_done(self, layer: int) -> None:
        """Backward has finished ``layer`` (its router weight's gradient is accumulated: the experts' come first)."""
        index = self.store.layers.index(layer)
        if self.early_lr is None:
            self._prefetch_layer(layer)
            return
        # this layer's gradients are final: step it now. Its counts come from the host copies recorded in
        # forward (no device sync), else one read per layer.
        counts = self.trace.host_counts(layer) if self.offload.prefetch else None
        if counts is None:
            counts = self.counts[layer].cpu()
        self._step_layer(index, counts, self.early_lr, early=True)
        if index > 0:
            self._prefetch_layer(self.store.layers[index - 1])  # next to be stepped

    def _prefetch_layer(self, layer: int) -> None:
        """Page in the state of ``layer``'s experts routed so far, the share the step will run on the GPU."""
        if not self.swapper.can_prefetch():
            return  # every slot is reserved or busy (the usual case after the first micro-batch): no host work
        seen = self.trace.poll(layer) if self.offload.prefetch else None
        if seen is not None:
            recs = [r for r in self.store.layer_records(layer) if seen[r.expert]]
            self.swapper.prefetch(self._split(recs)[0])

    def _split(self, recs: list) -> tuple[list, list]:
        return split_records(recs, step_on=self.auto.step_on(), hot=self.swapper.hot, rates=self.rates)

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def _step_layer(self, i: int, counts: torch.Tensor, lr: float, early: bool = False) -> None:
        """Step MoE layer ``store.layers[i]``'s routed experts (``counts``: its (E,) host counts). ``early`` (under
        backward): the GPU share's gradients are freed after its step, their squared norm kept in ``early_sq``."""
        layer = self.store.layers[i]
        recs = [r for r in self.store.layer_records(layer)
                if counts[r.expert] > 0 and any(p.grad is not None for p in r.params)]
        for rec in self.store.layer_records(layer):
            rec.frequency = 0.5 * rec.frequency + float(counts[rec.expert])
        self.catch_up.run(recs, self.step_index, self.lr_history)
        gpu_recs, cpu_recs = self._split(recs)
        if cpu_recs:
            self.swapper.settle(cpu_recs)  # here, not in the CPU thread: the swapper is not shared
            self.cpu.submit(cpu_recs, lr, self.clip_coef)
        if early:
            grads = [p.grad for rec in gpu_recs for p in rec.params if p.grad is not None]  # the ones freed below
            if grads:
                sq = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).square().sum()
                self.early_sq = sq if self.early_sq is None else self.early_sq + sq
        self.gpu.step(gpu_recs, lr, self.clip_coef, grad_scale=self.grad_scale)
        if early:  # the fused step was queued on this stream: memory freed here is reused only after it ran
            # Every record but the CPU share's (its gradients are still being copied out) drops its gradient,
            # idle experts' zeros included: they are views of the layer's stacked gradient, which is freed once
            # no view is left (moetrain.models.expert_grads).
            on_cpu = {id(rec) for rec in cpu_recs}
            for rec in self.store.layer_records(layer):
                if id(rec) not in on_cpu:
                    for p in rec.params:
                        p.grad = None
        for rec in recs:
            rec.step += 1
            rec.synced_to = self.step_index + 1
        self.stepped[layer] = (len(gpu_recs), len(cpu_recs))

    def begin_step(self, lr: float) -> None:
        """The optimizer step begins: its clock starts and the host learns the step's routing counts.

        From the routing trace's host copies when it saw them all: those were queued in each forward and have long
        landed, so the host does not wait for the end of backward here and can queue the step's paging and kernels
        while the GPU finishes backward (its host time, a third of a second at full size, then overlaps). Otherwise
        (no trace, or another rank's counts added) one read of the device sums: a sync with backward's end."""
        self.telemetry.start(self.device)
        if self.stepped and lr != self.early_lr:
            raise ValueError(f"step(lr={lr}) after layers were stepped during backward with lr={self.early_lr}: "
                             "pass begin_micro_batch the learning rate the step takes")
        if self.offload.prefetch and not self.counts_beyond_trace:
            traced = [self.trace.host_counts(layer) for layer in self.store.layers]
            self._counts_host = torch.stack([
                torch.zeros_like(self.counts[layer], device="cpu") if t is None else t.to(torch.int64)
                for layer, t in zip(self.store.layers, traced, strict=True)])
        else:
            self._counts_host = torch.stack([self.counts[layer] for layer in self.store.layers]).cpu()

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """Step every layer not stepped under backward (deepest first), then close the step's books."""
        counts, self._counts_host = self._counts_host, None
        self.lr_history.append(lr)
        early_layers = len(self.stepped)
        for i in reversed(range(len(self.store.layers))):
            if self.store.layers[i] not in self.stepped:
                self._step_layer(i, counts[i], lr)
        if self.cpu is not None:
            self.cpu.finish()
        on_gpu = sum(g for g, _ in self.stepped.values())
        on_cpu = sum(c for _, c in self.stepped.values())
        self.stepped.clear()
        self.early_lr = self.early_sq = None
        self.swapper.unreserve()
        self.swapper.revise_hot()
        self.swapper.drain_writes()
        self.step_index += 1
        if self.step_index == 1:
            self._master_in_step()
        if self.step_index == 1 and self.offload.hot_cache_gb is None:
            self._auto_hot_cache()
        for c in self.counts.values():
            c.zero_()
        self.counts_beyond_trace = False
        self.trace.reset()
        self.clip_coef = self.grad_scale = None  # a step without clipping must not reuse this one's
        self.telemetry.record(counts, on_gpu=on_gpu, on_cpu=on_cpu, early_layers=early_layers)
        self.telemetry.figures.update(self.auto.figures())
        self.swapper.reset_stats()  # the next step's counters include the page-ins its backward starts

    def _master_in_step(self) -> None:
        """After the first step: the fused kernel reads the master from the compute weights from now on where it
        can (:func:`~moetrain.offload.weight_masters.step_reads_weights`), before the hot cache is sized."""
        if step_reads_weights(list(self.store), masters_in_weights=self.swapper.masters_from_weights,
                              fused=self.gpu.fused_state == "ok", has_nvme=self.swapper.has_nvme,
                              catch_up=self.catch_up.enabled):
            self.swapper.use_weight_masters()

    def _auto_hot_cache(self) -> None:
        """``hot_cache_gb: null``: after the first step, size the hot cache from the device memory that
        step left unused (its peak known now) within the process's share of the device (a memory fraction caps it)
        and what other processes left free, keeping a margin of 10% of that share plus 1 GiB for what later steps
        allocate beyond step 1's peak. With 5% (expandable segments on), the DeepSeek-MoE-16B recipe's cache took
        1 100 slots (36 GiB) and the card then showed 138.6 of 139.8 GiB in use (run q3); the margin is not the
        allocator's fragmentation alone. On a CPU stand-in device, a quarter of the available host memory."""
        if self.device.type == "cuda":
            # the process's share of the card (set_per_process_memory_fraction), and what other processes left
            total = torch.cuda.get_device_properties(self.device).total_memory
            allowed = total * min(1.0, torch.cuda.get_per_process_memory_fraction(self.device))
            free, _ = torch.cuda.mem_get_info(self.device)
            reserved = torch.cuda.memory_reserved(self.device)
            spare = min(allowed - torch.cuda.max_memory_reserved(self.device),
                        free + reserved - torch.cuda.max_memory_reserved(self.device))
            spare -= HOT_CACHE_MARGIN_SHARE * allowed + HOT_CACHE_MARGIN_BYTES  # the planner's margin too
        else:
            import psutil

            spare = psutil.virtual_memory().available / 4
        self.swapper.grow_hot_cache(schedule.hot_capacity(
            nbytes=max(0.0, spare), record_bytes=self.swapper.hot_slot_bytes(), num_records=len(self.store.records),
            num_slots=self.swapper.num_slots))

    def zero_grad(self) -> None:
        for rec in self.store:
            for p in rec.params:
                p.grad = None

    def finalize(self) -> None:
        """Apply every deferred catch-up and land every page-out: the model and the store are current."""
        self.catch_up.run(list(self.store), self.step_index, self.lr_history)
        self.swapper.flush()

    def expert_steps(self) -> dict[str, int]:
        """AdamW step count per expert parameter name (torch's per-parameter ``state['step']``); a frozen expert's
        parameters are named with 0 (no state): their weights stream with the masters
        (:meth:`ExpertStateIO.named_master_tensors`), so a checkpoint's model part comes whole from the engine."""
        self.finalize()
        steps = {name: rec.step for rec in self.store for name in rec.names}
        return steps | {name: 0 for fx in self.store.frozen.values() for name in fx.names}

    def load_steps(self, steps: dict[str, int], lr_history: list[float], step_index: int) -> None:
        self.lr_history, self.step_index = list(lr_history), int(step_index)
        for name, step in steps.items():
            if name in self.store.frozen_by_name:
                continue  # a frozen expert: no state, whatever the saving run did
            rec, _ = self.store.by_name[name]
            rec.step = int(step)
            rec.synced_to = self.step_index  # exported state was caught up to its step
