"""Assembles the offload optimizer from its parts: the one place that constructs them (tests construct their own).

Order matters in two places: the store takes its fp32 masters from the model before the compute weights are
cast (or moved into the pager), and the engine is attached to the model (routing sink, backward signals) last.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Optional

import torch
import torch.nn as nn

from moetrain.offload import schedule
from moetrain.offload.adam import CpuAdam
from moetrain.offload.adam_cuda_order import CudaOrderCpuAdam
from moetrain.offload.catch_up import CatchUp
from moetrain.offload.composite import CompositeOptimizer
from moetrain.offload.compute_weights import WeightWriter, cast_experts, compute_dtype
from moetrain.offload.config import OffloadPlan
from moetrain.offload.cpu_step import CpuShare, CpuStepper
from moetrain.offload.engine import ExpertEngine
from moetrain.offload.gpu_step import GpuStep
from moetrain.offload.host_state import HostState
from moetrain.offload.lookahead import Lookahead
from moetrain.offload.master_segment import masters_from_weights
from moetrain.offload.rates import Rates, measure
from moetrain.offload.routing_trace import RoutingTrace
from moetrain.offload.state_io import ExpertStateIO
from moetrain.offload.store import ExpertStore
from moetrain.offload.swapper import Swapper
from moetrain.offload.telemetry import StepTelemetry
from moetrain.offload.weight_masters import paged_from
from moetrain.offload.weight_pager import ExpertWeightPager
from moetrain.optim import OptimizerConfig, decays, param_groups

CPU_CHUNK_NUMEL = 1 << 25  # parameters per CPU-path chunk: 64 MiB of bf16 per pinned buffer, 4 of them


def cpu_adam_for(kind: str, cfg: OptimizerConfig, device: torch.device) -> CudaOrderCpuAdam | CpuAdam:
    """The CPU share's AdamW, ``model.offload.schedule.cpu_adam``: ``exact`` (torch's fused CUDA kernel's operations
    and, on CUDA, the device's bias corrections) or ``deepspeed``."""
    return CpuAdam(cfg) if kind == "deepspeed" else CudaOrderCpuAdam(cfg, device=device)


def cpu_stepper_for(store: ExpertStore, cpu_adam: CudaOrderCpuAdam | CpuAdam, device: torch.device, *,
                    dtype: torch.dtype, swapper: Swapper, writer: WeightWriter, chunk_numel: int = CPU_CHUNK_NUMEL,
                    stepper_cls: type[CpuStepper] = CpuStepper) -> CpuStepper:
    """The CPU step path's pipeline for ``store``: chunks of ``chunk_numel`` parameters (at least the largest
    record, at most every record), paging-window marks on the swapper's telemetry, and new weights written to
    the pager when the compute weights are paged."""
    total = sum(r.numel for r in store)
    chunk = max(min(chunk_numel, total), max((r.numel for r in store), default=1))  # no record: every expert frozen
    return stepper_cls(cpu_adam, device, dtype, chunk, mark_transfer=swapper.mark_transfer,
                      write_weights=None if writer.pager is None else writer.write)


def build_offload_optimizer(model: nn.Module, cfg: OptimizerConfig, offload: OffloadPlan, *,
                            owns: Optional[Callable[[int, int], bool]] = None, store: Optional[ExpertStore] = None,
                            rates: Optional[Rates] = None, cpu_pool: Optional[Executor] = None,
                            cpu_chunk_numel: int = CPU_CHUNK_NUMEL,
                            cpu_stepper_cls: type[CpuStepper] = CpuStepper) -> CompositeOptimizer:
    """The dense AdamW and the expert engine for ``model`` (on its compute device).

    Args:
        owns: ``owns(layer, expert)``: hold state for these experts only (a data-parallel rank's share, see
            :mod:`moetrain.parallel`); None holds every expert.
        store: an expert store already holding the masters (streamed into the tiers by
            :func:`~moetrain.offload.staged_init.load_into_tiers`); None builds one from the model.
        rates: the link and CPU-Adam rates; None measures them under ``step_on: auto``.
        cpu_pool: the CPU share's worker thread; None: one on CUDA (beside the GPU share's asynchronous launches),
            none on a CPU device.
        cpu_chunk_numel, cpu_stepper_cls: the CPU step path's chunk size and pipeline class.
    """
    if offload.resident_weights == "no" and owns is not None:
        raise ValueError("model.offload.placement.resident_weights=no is for one process: with data or expert parallel "
                         "training keep resident_weights=yes")
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    cuda = device.type == "cuda"
    expert_names = model.expert_parameter_names()
    dense_named = [(n, p) for n, p in model.named_parameters() if n not in expert_names]
    dense = torch.optim.AdamW(param_groups(dense_named, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                              fused=True if cuda else None)
    store = store if store is not None else ExpertStore(model, offload, pin=cuda, owns=owns)
    for rec in store:
        if not all(decays(n, p) for n, p in zip(rec.names, rec.params, strict=True)):
            raise ValueError(f"{rec.prefix}: expert parameters are expected to be matrices (decayed)")
    dtype = compute_dtype(offload, device)
    pager: Optional[ExpertWeightPager] = None
    if offload.resident_weights == "no":  # the store took its fp32 master from the parameters first
        pager = store.pager  # staged init already moved them to host memory
        if pager is None:
            pager = ExpertWeightPager(model.moe_blocks(), device, dtype)
            store.pager = pager  # frozen experts' weights are read and loaded there (they have no record)
    elif dtype != next(iter([*store.records.values(), *store.frozen.values()])).params[0].dtype:
        cast_experts(model, dtype)  # after the store took its fp32 master from them (frozen experts too: packed)
    record_bytes = store.max_padded * 4
    records = len(store.records)  # experts that train (frozen ones have none): slots and cache follow them
    in_weights = masters_from_weights(offload.master, offload.resident_weights)
    swapper = Swapper(store, device, schedule.num_state_slots(offload, record_bytes=record_bytes,
                                                              num_records=max(1, records)),
                      masters_from_weights=in_weights)
    if offload.hot_cache_gb:
        swapper.grow_hot_cache(schedule.hot_capacity(nbytes=offload.hot_cache_gb * 2**30, record_bytes=record_bytes,
                                                     num_records=records, num_slots=swapper.num_slots))
    writer = WeightWriter(pager)
    sample = next(iter(store), None)  # None: every routed expert is frozen (the engine then steps nothing)
    gpu = GpuStep(swapper, cfg, writer, compressed=sample is not None and sample.layout.compressed,
                  scratch_bytes=offload.gpu_budget_gb * 2**30 / 4)
    cpu_adam = cpu_adam_for(offload.cpu_adam, cfg, device) if offload.step_on != "gpu" else None
    cpu = None
    if cpu_adam is not None:
        stepper = cpu_stepper_for(store, cpu_adam, device, dtype=dtype, swapper=swapper, writer=writer,
                                  chunk_numel=cpu_chunk_numel, stepper_cls=cpu_stepper_cls)
        # on CUDA the CPU share runs in a thread beside the GPU share, whose launches are asynchronous
        pool = cpu_pool
        if pool is None and cuda:
            pool = ThreadPoolExecutor(1, thread_name_prefix="moetrain-cpu-adam")
        cpu = CpuShare(stepper, HostState(store), weight_decay=cfg.weight_decay, pool=pool)
    if rates is None:  # auto's cost model weighs the store's own format: its bytes on the link, its codec on the host
        # (a bf16_sr master, or a fp32_split master's bf16 half, stays in the compute weights: weight_masters)
        rates = (measure(device, cpu_adam, dtype, codec=sample.codec,
                         state_bytes=(sample.layout.nbytes - (paged_from(sample) * 4 if in_weights else 0))
                         / sample.numel)
                 if offload.step_on == "auto" and sample is not None else Rates())
    lookahead = Lookahead(model, device)  # always measured (telemetry): one small matmul a layer, first micro-batch
    telemetry = StepTelemetry(store, swapper, rates, pager=pager, lookahead=lookahead,
                              cpu_streams=cpu.stepper.transfer_streams() if cpu is not None else ())
    engine = ExpertEngine(cfg=cfg, offload=offload, store=store, swapper=swapper, gpu=gpu, cpu=cpu,
                          catch_up=CatchUp(gpu, enabled=offload.idle_experts == "dense"), telemetry=telemetry,
                          state_io=None, trace=RoutingTrace(device), rates=rates, lookahead=lookahead)
    engine.state_io = ExpertStateIO(store, swapper, HostState(store), writer, finalize=engine.finalize)
    return attach(model, cfg, dense=dense, engine=engine, pager=pager)


def attach(model: nn.Module, cfg: OptimizerConfig, *, dense: torch.optim.Optimizer, engine: ExpertEngine,
           pager: Optional[ExpertWeightPager]) -> CompositeOptimizer:
    """Join ``dense`` and ``engine`` and attach the engine to ``model``: the seam (paged weights, routing sink)
    and one signal per MoE layer that tells the engine when backward has finished the layer.

    The signal is the router weight's post-accumulate-grad hook where the router trains (the router's backward
    runs after the experts'), else the gradient of the block's input (``MoEBlock.notify_backward``: after every
    part of the layer). Neither reads the routed experts' parameters: their gradients need not be accumulated
    into them. A frozen-router layer whose input needs no gradient (everything before it frozen) gets no signal
    and is stepped in step(); its backward is then the last of the step's anyway.
    """
    model.attach_offload(weights=pager, routing=engine)
    hooks = []
    for block in model.moe_blocks():
        if block.gate.weight.requires_grad:
            hooks.append(block.gate.weight.register_post_accumulate_grad_hook(
                lambda _p, layer=block.layer_idx: engine.backward_done(layer)))
        else:
            hooks.append(block.notify_backward(engine))
    return CompositeOptimizer(model, cfg, dense, engine, hooks=hooks)
