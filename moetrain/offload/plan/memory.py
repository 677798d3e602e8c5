"""Bytes per tier of one model under one offload config: :func:`make_plan`, the core of ``moetrain plan``.

Per parameter, on the GPU: dense parameters keep fp32 weights, grads and two moments (16 B), or only the fp32
weight (4 B) in a group ``model.train`` freezes (:mod:`.trained`), plus the bf16 copies autocast makes of their
matrices (2 B, frozen or not: they are still computed with); routed experts keep compute weights
(``compute_dtype``: 2 B in bf16, the default on a GPU, 4 B in fp32) and, with the grouped GEMM path, a gradient of
the same size for every expert, or only one MoE layer's when layers are stepped and their gradients freed under
backward (:func:`~moetrain.offload.schedule.layerwise_grads`); the device slots of state being stepped
(``gpu_budget_gb``, :func:`~moetrain.offload.schedule.num_state_slots`); the hot-expert state cache
(``hot_cache_gb``; null: sized as the engine sizes it after step 1, from what the GPU has left less a margin,
:func:`auto_hot_cache_bytes`, in slots without the master segment where the step reads the master from the compute
weights); an estimate of the activations of one micro-batch (:mod:`.activations`); and a reserve for the CUDA
context and allocator slack. The routed experts' master weights and moments take ``state_bytes_per_param`` bytes
(12 in fp32; 4.03 for bf16 masters with int8 moments) in host memory up to ``cpu_budget_gb``, and on NVMe past it.

The load peak must fit too, and it depends on how the model starts: with ``init_from`` and an offload tier the
experts' fp32 masters stream from the checkpoint straight into the store while their compute weights are built in
``compute_dtype`` (``offload/staged_init.py``), so the GPU holds the dense part in fp32 (4 B/param) and the experts at
their compute-weight bytes, and so does a large random initialisation under a tier (drawn on the GPU one expert tensor
at a time, :func:`~moetrain.offload.staged_init.random_into_tiers`); a small random initialisation, or ``init_from``
without a tier, puts the whole model on the GPU in fp32 (4 B/param) first. Host memory has a load peak as well: a
random initialisation of a small model (:func:`random_init_in_host_memory`) builds the fp32 model in host memory
first, next to the pinned expert state (a larger one is built on the GPU, with no host copy); ``init_from`` reads the
checkpoint one shard at a time (:mod:`.disk`). While training, a checkpoint save holds about two shards in host memory
(``max_shard_mb``), and ``checkpoint.async`` a host copy of the dense weights and AdamW moments too.
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Optional

import torch

from moetrain.config import ModelConfig
from moetrain.offload.config import OffloadPlan
from moetrain.offload.hot_cache_margin import HOT_CACHE_MARGIN_BYTES, HOT_CACHE_MARGIN_SHARE
from moetrain.offload.master_segment import host_drops_masters, masters_from_weights
from moetrain.offload.nvme import align_up
from moetrain.offload.plan.activations import activation_bytes
from moetrain.offload.plan.assumptions import (
    BF16_STREAM_GAIN,
    DEFAULT_NVME_GBPS,
    GPU_RESERVE,
    HOST_RESERVE,
    LOAD_BYTES_PER_PARAM,
    GiB,
    sustained_tflops,
)
from moetrain.offload.plan.disk import SAVE_SHARDS_IN_FLIGHT, Storage, checkpoint_bytes
from moetrain.offload.plan.report import Plan
from moetrain.offload.plan.step_time import compute_seconds, step_traffic
from moetrain.offload.plan.trained import dense_group_params
from moetrain.offload.rates import DEFAULT_DUPLEX_GBPS
from moetrain.offload.schedule import num_state_slots
from moetrain.offload.state_format import WEIGHT_HELD_BYTES, state_bytes_per_param


def count_parameters(model_config: ModelConfig) -> tuple[int, int, int]:
    """(dense params, routed-expert params, params of one expert).

    From the config's arithmetic (``ModelConfig.param_counts``, checked against transformers in the tests):
    building even a meta-device model runs every initialiser through torch's reference ops, about a minute
    for a 30 B-parameter MoE.
    """
    counts = model_config.param_counts()
    per_expert = 3 * model_config.hidden_size * model_config.moe_intermediate_size
    return counts["dense"], counts["expert"], per_expert



def random_init_in_host_memory(params: int) -> bool:
    """Whether a random initialisation of a model of ``params`` parameters is built in host memory before it
    moves to the GPU: models under ``SEEDED_INIT_MIN_PARAMS`` are (``MoEForCausalLM(config)`` on the CPU), larger
    ones are filled on the GPU directly (training/model_build.py ``random_model``)."""
    from moetrain.models.random_init import SEEDED_INIT_MIN_PARAMS

    return params < SEEDED_INIT_MIN_PARAMS


def machine_capacity() -> tuple[Optional[int], Optional[int]]:
    """(GPU memory, physical host memory) of this machine in bytes; None where it cannot be known here."""
    gpu = torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        host = None
    return gpu, host



def make_plan(model_config: ModelConfig, offload_config: OffloadPlan, tokens_per_step: int, *,
              gpu_capacity: Optional[int] = None, host_capacity: Optional[int] = None,
              disk_free: Optional[int] = None, link_gbps: Optional[float] = None,
              nvme_gbps: float = DEFAULT_NVME_GBPS,
              compute_tflops: Optional[float] = None, weight_bytes: Optional[int] = None,
              micro_batch_tokens: Optional[int] = None, layerwise_grads: bool = False, overlapped: bool = True,
              streamed_load: bool = False, activation_checkpointing: bool = False, residual_bytes: int = 4,
              from_checkpoint: Optional[bool] = None, storage: Optional[Storage] = None,
              trained_experts: Optional[int] = None, selection_source: Optional[str] = None,
              frozen_groups: tuple[str, ...] = ()) -> Plan:
    """Plan ``model_config`` under ``offload_config`` for ``tokens_per_step`` tokens per optimizer step.

    Args:
        gpu_capacity / host_capacity / disk_free: bytes; default to this machine's (GPU memory, physical
            host memory, free space at nvme_path). ``disk_free`` is the disk of the run: the ``init_from``
            directory, the checkpoints and the swap (unless ``storage.swap_separate``).
        link_gbps: defaults to the measured both-directions rate of the GPU machines (93 GB/s).
        nvme_gbps: the NVMe swap's rate for reads and writes together (an assumption: :data:`.DEFAULT_NVME_GBPS`).
        weight_bytes: size of an offloaded expert's resident compute weight and of its gradient; by default
            from ``compute_dtype`` (``auto`` is bf16 on a GPU: 2; ``fp32``: 4).
        compute_tflops: the forward and backward's sustained rate (default: :func:`.sustained_tflops` of the
            micro-batch's tokens, times :data:`.BF16_STREAM_GAIN` with a bf16 residual stream).
        micro_batch_tokens: tokens of one forward/backward, for the activation estimate and the compute rate
            (default: the step's).
        overlapped: the experts' state moves under backward (no clipping: layers are stepped as backward
            finishes them), so the step is the slowest of compute, link and NVMe; False (global-norm clipping):
            the state moves after backward, and the step is compute plus the slower of the other two.
        layerwise_grads: the engine steps each MoE layer and frees its expert gradients under backward
            (:func:`~moetrain.offload.schedule.layerwise_grads`), so only the largest layer's expert gradients are
            counted.
        streamed_load: the model starts from ``init_from`` and the experts' masters stream into the tier, so the
            load peak is fp32 dense + ``weight_bytes`` per expert parameter (ignored with tier ``none``: that
            loads the whole model in fp32). A random initialisation of ``SEEDED_INIT_MIN_PARAMS`` or more
            (``from_checkpoint`` False) under a tier streams as well.
        activation_checkpointing: decoder layers recomputed in backward (``model.activation_checkpointing``).
        residual_bytes: 4 for an fp32 residual stream under autocast, 2 for bf16 (``model.residual_dtype``).
        from_checkpoint: the model starts from ``init_from`` (with any tier); None: as ``streamed_load``. False
            is a random initialisation, built in fp32 in host memory first when it is small
            (:func:`random_init_in_host_memory`), on the GPU otherwise.
        storage: the ``init_from`` directory, the checkpoints and where the swap lives (:func:`.recipe_storage`);
            None: nothing on disk but the swap, and no checkpoint saves.
        trained_experts: routed experts that train, all layers (``model.train.routed_experts``; None: every one).
            Only they have state (host, NVMe, slots, hot cache), gradients, checkpointed moments, state paged
            and weights written back, and a weight-gradient GEMM; frozen experts' weights are still computed
            with (and paged for it under ``resident_weights: no``). ``selection_source``: where the count
            comes from, for the report.
        frozen_groups: dense ``model.train`` groups that do not train (:func:`.frozen_dense_groups`): their
            parameters keep only the fp32 weight (no gradient, no moments, none in a checkpoint) and have no
            weight-gradient GEMM.
    """
    dense, expert, per_expert = count_parameters(model_config)
    n_moe = len(model_config.moe_layers)
    total_experts = n_moe * model_config.num_experts
    trained = total_experts if trained_experts is None else max(0, min(trained_experts, total_experts))
    fraction = trained / total_experts if total_experts else 1.0
    trained_params = round(expert * fraction)  # every routed expert has the same shape
    groups = dense_group_params(model_config)
    frozen_groups = tuple(g for g in frozen_groups if groups.get(g))  # a group the model lacks freezes nothing
    frozen_dense = sum(groups[g] for g in frozen_groups)
    trained_dense = dense - frozen_dense
    storage = storage if storage is not None else Storage()
    gpu_cap, host_cap = machine_capacity()
    gpu_capacity = gpu_capacity if gpu_capacity is not None else gpu_cap
    host_capacity = host_capacity if host_capacity is not None else host_cap
    off = offload_config
    if weight_bytes is None:
        weight_bytes = 4 if off.compute_dtype == "fp32" else 2
    paged_weights = off.tier != "none" and off.resident_weights == "no"
    weight_buffers = 2 * weight_bytes * (expert // n_moe if n_moe else 0)  # the pager's two layer-sized buffers
    bpp = state_bytes_per_param(off.master, off.moments, off.quant_block)
    # one expert's state record as the store lays it: its formatted bytes, padded to the I/O alignment
    record = align_up(math.ceil(bpp * per_expert))
    # its master segment where the compute weights can hold it (moetrain.offload.master_segment.master_floats)
    held_master = align_up(WEIGHT_HELD_BYTES[off.master] * per_expert, 64) if off.master in WEIGHT_HELD_BYTES else 0
    state = record * trained
    micro = micro_batch_tokens if micro_batch_tokens is not None else tokens_per_step
    rows: list[tuple[str, str, int]] = []
    dense_moments = 8 * trained_dense  # AdamW's two fp32 moments of each trained dense parameter
    if trained_dense:  # 4 B weight + 4 B grad + the moments
        rows.append(("gpu", "dense weights, grads, AdamW moments (fp32)", 8 * trained_dense + dense_moments))
    if frozen_dense:
        rows.append(("gpu", "frozen dense weights (fp32; no grads, no moments)", 4 * frozen_dense))
    rows.append(("gpu", "dense matrices: bf16 autocast copies", 2 * dense))
    hot, host, nvme, layerwise = 0, 0, 0, False
    hot_record = record
    if off.tier == "none":
        if trained_params < expert:  # frozen experts: the fp32 weight only
            rows.append(("gpu", "experts: weights (fp32), grads and moments of the trained ones",
                         4 * expert + 12 * trained_params))
        else:
            rows.append(("gpu", "experts: weights, grads, moments (fp32)", 16 * expert))
    else:
        layerwise = layerwise_grads
        try:
            slots = num_state_slots(off, record_bytes=record, num_records=max(1, trained))
        except ValueError:
            slots = 1  # the pre-flight and the engine refuse this budget; the plan still shows what one slot takes
        grads = (expert // n_moe if layerwise else expert) * fraction  # every MoE layer has the same experts
        if paged_weights:  # two layer-sized device buffers; the weights' home is host memory
            rows.append(("gpu", f"experts: paged compute weights, 2 layer buffers ({weight_bytes} B/param)",
                         weight_buffers))
        else:
            rows.append(("gpu", f"experts: resident compute weights ({weight_bytes} B/param)", weight_bytes * expert))
        whose = "gradients of " + ("one layer" if layerwise else "every expert")
        if trained < total_experts:
            whose = "one layer's trained gradients" if layerwise else "gradients of the trained experts"
        rows += [("gpu", f"experts: {whose} ({weight_bytes} B/param)", round(weight_bytes * grads)),
                 ("gpu", f"expert state slots ({slots} x {record / 2**20:.1f} MiB)", slots * record)]
        # a host record without the master the weights hold (as the store places it: moetrain.offload.store)
        host_record = record - (held_master if host_drops_masters(off.master, off.resident_weights, off.step_on)
                                else 0)
        in_host = 0
        if off.tier == "cpu":
            budget = None if off.cpu_budget_gb is None else int(off.cpu_budget_gb * GiB)
            in_host = trained if budget is None else min(trained, budget // host_record)
        host, nvme = in_host * host_record, (trained - in_host) * record
        staging = slots * record if nvme else 0
    recomputed = ", layers recomputed" if activation_checkpointing else ""
    stream = ", bf16" if residual_bytes == 2 else ""  # model.residual_dtype
    rows += [("gpu", f"activations, {micro} tokens a micro-batch{stream} (estimate{recomputed})",
              activation_bytes(model_config, micro, activation_checkpointing, residual_bytes=residual_bytes)),
             ("gpu", "CUDA context, allocator slack (reserve)", GPU_RESERVE)]
    if off.tier != "none":
        # the cache comes last: with hot_cache_gb null it takes what the GPU has left, by the engine's rule
        used = sum(n for tier, _, n in rows if tier == "gpu")
        if off.hot_cache_gb is None:
            spare = 0 if gpu_capacity is None else auto_hot_cache_bytes(gpu_capacity, used, dense_moments)
        else:
            spare = int(off.hot_cache_gb * GiB)
        # up to every expert, where the engine (schedule.hot_capacity) stops at the records without a slot: the
        # two differ only when the slots and the cache together could hold more than every expert
        if (off.hot_cache_gb is None and not nvme and off.idle_experts == "skip" and weight_bytes == 2
                and masters_from_weights(off.master, off.resident_weights)):
            # the step reads the master from the weights after step 1, so the cache sized then holds none
            # (moetrain.offload.weight_masters.step_reads_weights)
            hot_record = record - held_master
        hot = min(trained, spare // hot_record)
        rows.append(("gpu", f"hot-expert state cache ({hot} x {hot_record / 2**20:.1f} MiB)", hot * hot_record))
        masters = ", masters in the GPU's weights" if host and host_record < record else ""
        rows.append(("host", f"expert state (pinned{masters})", host))
        if paged_weights:
            rows.append(("host", f"experts: compute weights (pinned, {weight_bytes} B/param)", weight_bytes * expert))
            host += weight_bytes * expert
        if nvme:
            swap_tier = "nvme" if storage.swap_separate else "disk"
            rows += [("host", "NVMe staging buffers (pinned)", staging), (swap_tier, "expert state (NVMe swap)", nvme)]
            host += staging
    rows.append(("host", "process, data workers (reserve)", HOST_RESERVE))
    host += HOST_RESERVE
    # loading: a small random initialisation builds the fp32 model in host memory next to the pinned state (the
    # store takes the experts' masters from it), a large one on the GPU; init_from reads one shard at a time
    from_checkpoint = streamed_load if from_checkpoint is None else from_checkpoint
    small_model = random_init_in_host_memory(dense + expert)  # a random init of it is built in fp32 on the CPU
    pinned = " next to the pinned expert state" if off.tier != "none" else ""
    if from_checkpoint:
        host_load = host + storage.load_shard_bytes
        host_load_what = (f"init_from is read one shard at a time ({storage.load_shard_bytes / GiB:.2f} GiB)"
                          + (pinned or " onto the GPU"))
    elif small_model:
        host_load = host + LOAD_BYTES_PER_PARAM * (dense + expert)
        host_load_what = ("random init builds the fp32 model in host memory first "
                          f"({LOAD_BYTES_PER_PARAM * (dense + expert) / GiB:.2f} GiB)" + (pinned and "," + pinned))
    else:
        host_load = host
        host_load_what = ("random init draws the experts one tensor at a time on the GPU (no host copy): host memory "
                          "holds the pinned expert state") if pinned else \
            "random init builds the fp32 model on the GPU (no host copy)"
    one = checkpoint_bytes(dense, expert, offload=off, trained_expert=trained_params, trained_dense=trained_dense)
    if storage.checkpoints:
        rows.append(("host", f"checkpoint save: {SAVE_SHARDS_IN_FLIGHT} shards in flight "
                             f"(max_shard_mb {storage.max_shard_bytes // 2**20})",
                     SAVE_SHARDS_IN_FLIGHT * min(storage.max_shard_bytes, one)))
        if storage.async_save:  # the dense part is copied (experts too with tier none); expert state is read in place
            weights, moments = (dense, trained_dense) if off.tier != "none" else (dense + expert,
                                                                                 trained_dense + trained_params)
            rows.append(("host", "checkpoint.async: host copy of fp32 weights + moments", 4 * weights + 8 * moments))
        host = sum(n for tier, _, n in rows if tier == "host")
    disk_notes = []
    if storage.model_dir_what:
        rows.append(("disk", storage.model_dir_what, storage.model_dir_bytes))
    if storage.checkpoints:
        rows.append(("disk", f"checkpoints: {storage.checkpoints} x {one / GiB:.2f} GiB", storage.checkpoints * one))
        moments = "fp32" if off.tier == "none" else off.moments
        kinds = f"fp32 dense, {moments} experts"
        if frozen_dense:
            kinds = f"fp32 trained dense, {moments} experts" if trained_dense else f"{moments} experts; dense frozen"
        disk_notes.append(f"checkpoints: {storage.checkpoints_what}; each holds fp32 weights "
                          f"({4 * (dense + expert) / GiB:.2f} GiB) and the AdamW moments ({kinds}: "
                          f"{(one - 4 * (dense + expert)) / GiB:.2f} GiB)")
    disk = sum(n for tier, _, n in rows if tier == "disk")
    gpu = sum(n for tier, _, n in rows if tier == "gpu")
    if disk_free is None and nvme and not storage.swap_separate and off.nvme_path and os.path.isdir(off.nvme_path):
        disk_free = shutil.disk_usage(off.nvme_path).free
    link_bpp = bpp  # a paged record's bytes each way; the weights may hold the host tier's master (or its bf16 half)
    if off.tier != "none" and state and masters_from_weights(off.master, off.resident_weights):
        link_bpp -= WEIGHT_HELD_BYTES[off.master] * in_host / trained
    traffic = step_traffic(model_config, tokens_per_step=tokens_per_step, micro_batch_tokens=micro,
                           per_expert=per_expert, state_bpp=link_bpp, hot_experts=hot, offloaded=off.tier != "none",
                           paged_weights=paged_weights, weight_bytes=weight_bytes, trained_fraction=fraction,
                           swap_per_record=nvme / trained if trained else 0.0)
    link = link_gbps if link_gbps is not None else DEFAULT_DUPLEX_GBPS
    # a large random initialisation under a tier streams its experts' masters into the store as init_from does
    streamed = off.tier != "none" and (streamed_load or not (from_checkpoint or small_model))
    tflops = compute_tflops if compute_tflops is not None else (
        sustained_tflops(micro, latent_attention=model_config.is_mla) * (BF16_STREAM_GAIN if residual_bytes == 2
                                                                         else 1.0))
    compute_s = compute_seconds(model_config, dense_params=dense, per_expert=per_expert,
                                tokens_per_step=tokens_per_step, compute_tflops=tflops,
                                trained_fraction=fraction, frozen_dense_params=frozen_dense,
                                recomputed=activation_checkpointing)
    return Plan(tier=off.tier, gpu_bytes=gpu, host_bytes=host, nvme_bytes=nvme, gpu_capacity=gpu_capacity,
                host_capacity=host_capacity, disk_free=disk_free, expert_params=expert, dense_params=dense,
                active_experts=traffic.active_experts, total_experts=total_experts,
                moved_bytes=traffic.moved_bytes, link_gbps=link, compute_s=compute_s, overlapped=overlapped,
                transfer_s=traffic.moved_bytes / (link * 1e9), breakdown=rows, nvme_moved_bytes=traffic.nvme_bytes,
                nvme_gbps=nvme_gbps, nvme_s=traffic.nvme_bytes / (nvme_gbps * 1e9),
                gpu_load_bytes=load_peak_bytes(dense, expert, weight_bytes, streamed=streamed,
                                               paged_buffer_bytes=weight_buffers if paged_weights else None),
                master=off.master, moments=off.moments, state_bpp=bpp, record_bytes=record,
                hot_record_bytes=hot_record, hot_cache_experts=hot,
                hot_cache_auto=off.hot_cache_gb is None, paged_experts=traffic.paged_experts, layerwise_grads=layerwise,
                streamed_load=streamed, load_source="init_from" if from_checkpoint else "random init",
                weight_bytes=weight_bytes, paged_weights=paged_weights,
                host_load_bytes=host_load, host_load_what=host_load_what, disk_bytes=disk, disk_notes=disk_notes,
                swap_separate=storage.swap_separate, swap_free=storage.swap_free,
                trained_experts=trained if trained_experts is not None or selection_source else None,
                selection_source=selection_source, frozen_groups=frozen_groups, frozen_dense_params=frozen_dense)


def auto_hot_cache_bytes(gpu_capacity: int, used: int, dense_moments: int) -> int:
    """Bytes of an automatic hot cache (``hot_cache_gb: null``) on a GPU of ``gpu_capacity`` bytes, by the rule of
    :meth:`~moetrain.offload.engine.ExpertEngine._auto_hot_cache`: after step 1, the device's memory less step 1's
    peak, less a margin of :data:`~moetrain.offload.hot_cache_margin.HOT_CACHE_MARGIN_SHARE` of the device plus
    :data:`~moetrain.offload.hot_cache_margin.HOT_CACHE_MARGIN_BYTES`. Step 1's peak is the planned GPU rows
    before the cache (``used``) but the dense AdamW moments (``dense_moments``, counted in ``used``): torch creates
    them in the first ``optimizer.step()``, after that peak, and the margin takes them."""
    margin = HOT_CACHE_MARGIN_SHARE * gpu_capacity + HOT_CACHE_MARGIN_BYTES
    return max(0, math.floor(gpu_capacity - (used - dense_moments) - margin))


def load_peak_bytes(dense: int, expert: int, weight_bytes: int, *, streamed: bool,
                    paged_buffer_bytes: Optional[int] = None) -> int:
    """GPU bytes while the model loads: the dense part in fp32, and the routed experts in fp32 too unless their
    masters stream into the tier (``init_from`` with a tier), in which case only their compute weights
    (``weight_bytes`` per parameter) are on the GPU; with paged weights not even those: only the pager's
    ``paged_buffer_bytes`` of device buffers."""
    if streamed and paged_buffer_bytes is not None:
        return LOAD_BYTES_PER_PARAM * dense + paged_buffer_bytes
    return LOAD_BYTES_PER_PARAM * dense + (weight_bytes if streamed else LOAD_BYTES_PER_PARAM) * expert
