"""The memory planner behind ``moetrain plan``: bytes per tier, whether they fit, and the floor of a step.

Per parameter (see the design notes), on the GPU: dense parameters keep fp32 weights, grads and two moments
(16 B) plus the bf16 copies autocast makes of their matrices (2 B); routed experts keep compute weights
(``compute_dtype``: 2 B in bf16, the default on a GPU, 4 B in fp32) and, with the grouped GEMM path, a
gradient of the same size for every expert, or only one MoE layer's when layers are stepped and their
gradients freed under backward (``accumulate_grad_batches == 1``, ``max_grad_norm == 0``, ``step_on: gpu``);
the device slots of state being stepped (``gpu_budget_gb``); the hot-expert state cache (``hot_cache_gb``,
null: what is left); an estimate of the activations of one micro-batch; and a reserve for the CUDA context
and allocator slack. The routed experts' master weights and moments take ``state_bytes_per_param`` bytes
(12 in fp32; 4.03 for bf16 masters with int8 moments) in host memory up to ``cpu_budget_gb``, and on NVMe
past it. The load peak must fit too, and it depends on how the model starts: with ``init_from`` and an
offload tier the experts' fp32 masters stream from the checkpoint straight into the store while their compute
weights are built in ``compute_dtype`` (``offload/staged_init.py``), so the GPU holds the dense part in fp32
(4 B/param) and the experts at their compute-weight bytes; random initialisation, or ``init_from`` without a
tier, puts the whole model on the GPU in fp32 (4 B/param) first. Host memory has a load peak as well: a
random initialisation of a small model (:func:`random_init_in_host_memory`) builds the fp32 model in host memory
first, next to the pinned expert state (a larger one is built on the GPU, with no host copy); ``init_from``
reads the checkpoint one shard at a time (the largest shard of the directory; before the download
:data:`HF_SHARD_BYTES`, at most the model in bf16). While training, a checkpoint save holds about two shards in
host memory (``max_shard_mb``), and ``checkpoint.async`` a host copy of the dense weights and AdamW moments too.

The disk holds the ``init_from`` directory (its safetensors, or the preset in bf16 before the download), the
NVMe swap, and the checkpoints (:func:`checkpoint_bytes`: fp32 weights and the AdamW moments as stored) that
exist at once: a new checkpoint is complete before the oldest beyond ``keep_last`` is deleted
(:func:`checkpoints_on_disk`). They are one tier, ``disk``, unless the swap folder is on another filesystem
(then it is the ``nvme`` tier). :func:`plan_overflows` gives the lines of a plan that do not fit.

The floor of an optimizer step is ``max(compute, bytes moved / link)``: the active experts' state that is
not in the hot cache goes up and comes back (``2 * state_bytes_per_param`` B/param, both directions at
once), compute is ``6 * active params * tokens`` FLOPs at an assumed sustained rate. The expected number
of active experts of a layer is ``E * (1 - (1 - 1/E) ** (tokens * k))`` (uniform routing; balanced routers
are close to it), and a cached expert is taken to be active as often as any other (the cache keeps the
hottest, so fewer bytes move than this says).

:func:`largest_preset` answers the question of the design notes for one machine: which preset is the
largest that one GPU can fully fine-tune, and with which tier, state formats and gradient schedule.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import sys
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch

from moetrain.config import CONFIGS_DIR, ModelConfig
from moetrain.offload.config import OffloadConfig
from moetrain.offload.nvme import align_up
from moetrain.offload.rates import DEFAULT_DUPLEX_GBPS
from moetrain.offload.state_format import state_bytes_per_param

GiB = 2**30
DEFAULT_COMPUTE_TFLOPS = 400.0
"""Sustained bf16 training throughput assumed for the compute estimate (about 40% of an H100's peak)."""
LOAD_BYTES_PER_PARAM = 4
"""Bytes per parameter built in fp32 at load: the dense part always; the routed experts too under random
initialisation or ``init_from`` without an offload tier (the store takes their masters and casts their compute
weights only afterwards). With ``init_from`` and a tier the experts are built at their compute-weight bytes
instead and their masters stream into the tier (training/module.py ``_build_model``, offload/staged_init.py)."""
GPU_RESERVE = 2 * GiB
"""CUDA context, cuBLAS workspaces and the caching allocator's fragmentation: not in any tensor counted here."""
HOST_RESERVE = 8 * GiB
"""The OS, the Python process with torch and its CUDA context, data-loader workers and the CPU step's
pinned chunk buffers: host memory the expert state cannot have."""
LOSS_CHUNK_TOKENS = 4096
"""Tokens per chunk of the training loss (``models.decoder.chunked_lm_loss``): one chunk's logits at a time."""
MASTERS = ("fp32", "bf16_kahan", "bf16_sr")
"""Master-weight formats, most exact first (a bf16 master without compensation loses small updates)."""
MOMENTS = ("fp32", "bf16", "int8")
"""Moment formats, most exact first."""
HF_SHARD_BYTES = 5 * 10**9
"""Size of one safetensors shard of a Hugging Face download (transformers' default ``max_shard_size``, 5 GB):
what reading ``init_from`` holds in host memory at a time when the directory is not here to measure."""
SAVE_SHARDS_IN_FLIGHT = 2
"""Shards a checkpoint save holds in host memory: the shard's tensors and safetensors' serialisation of them
(training/checkpoint.py)."""
DEFAULT_SHARD_MB = 2048
"""``checkpoint.max_shard_mb`` when a recipe does not set it (``CheckpointCallback``'s default)."""


@dataclass(frozen=True)
class Storage:
    """What a run puts on disk besides the swap, and what reading and writing it costs in host memory.

    Attributes:
        model_dir_bytes: bytes the ``init_from`` directory needs on the run's disk (0: none, or already in its
            used space); model_dir_what: its row's text.
        load_shard_bytes: host memory of reading ``init_from`` (one shard at a time).
        checkpoints: checkpoints on disk at once (0: none counted); checkpoints_what: why that many.
        max_shard_bytes: one checkpoint shard (``checkpoint.max_shard_mb``); async_save: ``checkpoint.async``.
        swap_separate: the swap folder is on another filesystem than the run directory, with ``swap_free``
            bytes free (None: unknown); otherwise the swap counts on the run's disk.
    """

    model_dir_bytes: int = 0
    model_dir_what: str = ""
    load_shard_bytes: int = HF_SHARD_BYTES
    checkpoints: int = 0
    checkpoints_what: str = ""
    max_shard_bytes: int = DEFAULT_SHARD_MB * 2**20
    async_save: bool = False
    swap_separate: bool = False
    swap_free: Optional[int] = None


@dataclass
class Plan:
    """Bytes per tier and the step floor of one model under one offload config.

    Attributes:
        gpu_bytes / host_bytes / nvme_bytes: planned use of each tier while training (host: with a checkpoint
            save in flight; nvme: the swap, part of ``disk_bytes`` unless ``swap_separate``).
        gpu_load_bytes: the GPU peak while loading: fp32 dense + the experts at their compute-weight bytes when
            streamed (``streamed_load``: init_from with a tier), else the whole model in fp32.
        host_load_bytes / host_load_what: the host peak while loading (the fp32 model of a random init, or one
            shard of ``init_from``, next to the pinned state), and how it comes about.
        disk_bytes: the run's disk: the ``init_from`` directory, the swap (unless ``swap_separate``) and the
            checkpoints on disk at once; disk_notes: lines that explain the disk rows.
        gpu_capacity / host_capacity / disk_free: what the machine has (None: unknown here); swap_free: the free
            bytes of the swap's own filesystem when ``swap_separate``.
        expert_params / dense_params: parameter counts; active_experts: expected per step, all layers.
        master / moments / state_bpp: the experts' state format and its bytes per parameter.
        record_bytes: one expert's state record as the store lays it (aligned).
        hot_cache_experts: experts whose state the GPU cache holds; hot_cache_auto: sized from what is left.
        paged_experts: expected active experts per step whose state is paged (not in the hot cache).
        layerwise_grads: only one MoE layer's expert gradients are live (stepped and freed under backward).
        paged_weights: the experts' compute weights live in host memory (``resident_weights: no``).
        moved_bytes: bytes over the link per step; link_gbps: the rate used; compute_s / transfer_s / floor_s.
        breakdown: (tier, what, bytes) lines.
    """

    tier: str
    gpu_bytes: int
    host_bytes: int
    nvme_bytes: int
    gpu_capacity: Optional[int]
    host_capacity: Optional[int]
    disk_free: Optional[int]
    expert_params: int
    dense_params: int
    active_experts: float
    total_experts: int
    moved_bytes: float
    link_gbps: float
    compute_s: float
    transfer_s: float
    breakdown: list[tuple[str, str, int]] = field(default_factory=list)
    gpu_load_bytes: int = 0
    master: str = "fp32"
    moments: str = "fp32"
    state_bpp: float = 12.0
    record_bytes: int = 0
    hot_cache_experts: int = 0
    hot_cache_auto: bool = False
    paged_experts: float = 0.0
    layerwise_grads: bool = False
    streamed_load: bool = False
    weight_bytes: int = 2
    paged_weights: bool = False
    host_load_bytes: int = 0
    host_load_what: str = ""
    disk_bytes: int = 0
    disk_notes: list[str] = field(default_factory=list)
    swap_separate: bool = False
    swap_free: Optional[int] = None

    def load_what(self) -> str:
        """How the load peak comes about, in words."""
        if self.streamed_load and self.paged_weights:
            return ("init_from streams the experts' masters into the tier and their weights into host memory: "
                    "fp32 dense + two layers of experts")
        if self.streamed_load:
            return (f"init_from streams the experts' masters into the tier: fp32 dense + "
                    f"{self.weight_bytes} B/param experts")
        return "the whole model in fp32 (random init, or init_from without an offload tier)"

    @property
    def floor_s(self) -> float:
        return max(self.compute_s, self.transfer_s)

    def fits(self) -> dict[str, Optional[bool]]:
        """Per tier (``gpu``, ``host``, ``disk``, and ``nvme`` when the swap has its own filesystem): True /
        False, or None when the capacity is unknown on this machine. The GPU and the host must hold both the
        training footprint and the load peak."""
        return {tier: verdict for tier, _, _, _, verdict in self._tiers()}

    def _tiers(self) -> list[tuple[str, int, Optional[int], int, Optional[bool]]]:
        """(tier, bytes while training, capacity, bytes at load, verdict) of every tier the plan weighs."""
        def ok(used: int, cap: Optional[int]) -> Optional[bool]:
            return None if cap is None else used <= cap
        tiers = [("gpu", self.gpu_bytes, self.gpu_capacity, self.gpu_load_bytes),
                 ("host", self.host_bytes, self.host_capacity, self.host_load_bytes),
                 ("disk", self.disk_bytes, self.disk_free, 0)]
        if self.swap_separate:
            tiers.append(("nvme", self.nvme_bytes, self.swap_free, 0))
        return [(tier, used, cap, load, ok(max(used, load), cap) if used or load else True)
                for tier, used, cap, load in tiers]

    def verdict_lines(self) -> dict[str, str]:
        """The ``total`` line of every tier with something on it, as :meth:`format` prints it (unindented)."""
        def gib(n: Optional[float]) -> str:
            return "unknown" if n is None else f"{n / GiB:8.2f} GiB"

        lines = {}
        for tier, used, cap, load, verdict in self._tiers():
            if not (used or load):
                continue
            state = {True: "fits", False: "DOES NOT FIT", None: "capacity unknown here"}[verdict]
            note = f" (peak at load: {load / GiB:.2f} GiB)" if load > used else ""
            lines[tier] = f"{tier:<5} total {gib(used)} of {gib(cap)}: {state}{note}"
        return lines

    def load_lines(self) -> dict[str, str]:
        """The ``peak at load`` line of the GPU and of the host (unindented)."""
        return {"gpu": f"gpu   peak at load {self.gpu_load_bytes / GiB:8.2f} GiB: {self.load_what()}",
                "host": f"host  peak at load {self.host_load_bytes / GiB:8.2f} GiB: {self.host_load_what}"}

    def fits_all(self) -> bool:
        """Every tier fits (an unknown capacity does not count as fitting)."""
        return all(v is True for v in self.fits().values())

    def format(self) -> str:
        """A human-readable report (what ``moetrain plan`` prints)."""
        def gib(n: Optional[float]) -> str:
            return "unknown" if n is None else f"{n / GiB:8.2f} GiB"

        def count(n: int) -> str:
            return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"

        def secs(t: float) -> str:
            return f"{t:.3f} s" if t >= 0.1 else f"{t * 1e3:.3f} ms"

        lines = [f"offload tier: {self.tier}   parameters: {count(self.dense_params)} dense + "
                 f"{count(self.expert_params)} in routed experts"]
        if self.tier != "none":
            lines.append(f"expert state: master {self.master}, moments {self.moments}: {self.state_bpp:.3f} B/param "
                         f"(fp32 state: {state_bytes_per_param():.0f}); expert gradients: "
                         + ("one MoE layer's at a time (stepped under backward)" if self.layerwise_grads
                            else "every expert's"))
        lines.append("")
        order = ("gpu", "host", "disk", "nvme")
        lines += [f"  {tier:<5} {what:<56} {gib(n)}"
                  for tier, what, n in sorted(self.breakdown, key=lambda row: order.index(row[0]))]
        lines.append("")
        lines += [f"  {line}" for line in self.verdict_lines().values()]
        lines += [f"  {line}" for line in self.load_lines().values()]
        lines += [f"  disk  {note}" for note in self.disk_notes]
        if self.tier != "none":
            cache = self.hot_cache_experts
            how = "auto: what the GPU has left" if self.hot_cache_auto else "hot_cache_gb"
            if self.hot_cache_auto and self.gpu_capacity is None:
                how = "auto: GPU capacity unknown here, sized at start-up"
            lines.append(f"  hot-expert state cache ({how}): {cache} of {self.total_experts} experts, "
                         f"{cache * self.record_bytes / GiB:.2f} GiB")
        bound = "link" if self.transfer_s > self.compute_s else "compute"
        lines += ["", f"  active experts per step (expected): {self.active_experts:.0f} of {self.total_experts}"
                  + (f", {self.paged_experts:.0f} paged" if self.hot_cache_experts else ""),
                  f"  link: {self.moved_bytes / GiB:.3f} GiB per step at {self.link_gbps:.0f} GB/s -> "
                  f"{secs(self.transfer_s)};  compute: {secs(self.compute_s)}",
                  f"  floor of a step: {secs(self.floor_s)} ({bound}-bound)"]
        return "\n".join(lines)


def plan_overflows(plan: Plan) -> list[str]:
    """The lines of ``plan`` that say something does not fit, as ``moetrain plan`` prints them (unindented): the
    ``total`` line of every tier that overflows (``gpu``, ``host``, ``disk``, ``nvme``), each followed, for the GPU
    and the host, by its ``peak at load`` line when the load peak is past the capacity. Empty when every tier
    fits; a capacity unknown here is not an overflow. What a pre-flight check prints when it refuses a run, e.g.
    the DeepSeek-MoE-16B recipe as it was (fp32 state, 110 GiB pinned + NVMe, 4 GiB checkpoint shards, 5
    checkpoints kept) on one H200 with 125 GiB of host memory and 64 GiB of disk::

        host  total   126.89 GiB of   125.00 GiB: DOES NOT FIT
        disk  total  1002.70 GiB of    64.00 GiB: DOES NOT FIT

    and a host that holds the training footprint but not the load peak (here a small model's random
    initialisation, built in host memory)::

        host  total     8.01 GiB of     8.02 GiB: DOES NOT FIT (peak at load: 8.02 GiB)
        host  peak at load     8.02 GiB: random init builds the fp32 model in host memory first (0.01 GiB), ...
    """
    totals, loads = plan.verdict_lines(), plan.load_lines()
    out = []
    for tier, _, cap, load, verdict in plan._tiers():
        if verdict is not False:
            continue
        out.append(totals[tier])
        if tier in loads and cap is not None and load > cap:
            out.append(loads[tier])
    return out


def count_parameters(model_config: ModelConfig) -> tuple[int, int, int]:
    """(dense params, routed-expert params, params of one expert).

    From the config's arithmetic (``ModelConfig.param_counts``, checked against transformers in the tests):
    building even a meta-device model runs every initialiser through torch's reference ops, about a minute
    for a 30 B-parameter MoE.
    """
    counts = model_config.param_counts()
    per_expert = 3 * model_config.hidden_size * model_config.moe_intermediate_size
    return counts["dense"], counts["expert"], per_expert


def activation_bytes(config: ModelConfig, tokens: int, checkpointed: bool = False) -> int:
    """An estimate of what autograd keeps for backward from one micro-batch of ``tokens`` tokens.

    A tally of the tensors each layer saves under bf16 autocast, attention through SDPA (no (L, L) score
    matrix: a per-head fp32 logsumexp), and the loss's logits one :data:`LOSS_CHUNK_TOKENS` chunk at a time.
    Per token and layer: each of the two norms saves its fp32 input and hands on a bf16 output; attention
    saves q, k, v and its output (MLA also its latents); a routed expert saves, for each of the k copies of
    a token, its gathered input, gate, up and activated product and its output; the router its fp32 logits
    and probabilities; a shared expert or dense MLP its gate, up and product. Temporaries and fragmentation
    are in :data:`GPU_RESERVE`. The test checks it against the bytes autograd saves in a real forward
    (tests/offload/test_plan.py).

    ``checkpointed`` (``model.activation_checkpointing``): every layer keeps only its fp32 input, and one
    layer's full set (the largest, :func:`layer_activation_bytes`) exists while backward recomputes it.
    """
    layers, largest, outside = _activation_parts(config)
    loss_chunk = 2 * 4 * min(tokens, LOSS_CHUNK_TOKENS) * config.vocab_size  # fp32 logits and their gradient
    if checkpointed:
        return tokens * (config.num_hidden_layers * 4 * config.hidden_size + largest + outside) + loss_chunk
    return tokens * (layers + outside) + loss_chunk


def layer_activation_bytes(config: ModelConfig, tokens: int) -> int:
    """What the largest decoder layer saves for ``tokens`` tokens: with activation checkpointing, the part of
    :func:`activation_bytes` that exists only while backward recomputes that layer."""
    return tokens * _activation_parts(config)[1]


def _activation_parts(config: ModelConfig) -> tuple[int, int, int]:
    """Bytes per token saved by (all decoder layers, the largest one, the final norm and what follows)."""
    h, nh = config.hidden_size, config.num_attention_heads
    if config.is_mla:
        qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        q, kv, out = nh * qk, nh * (qk + config.v_head_dim), nh * config.v_head_dim
        latent = config.kv_lora_rank + config.qk_rope_head_dim + (config.q_lora_rank or 0)
    else:
        q = out = nh * config.attn_head_dim
        kv, latent = 2 * config.kv_heads * config.attn_head_dim, 0
    norm = 3 * 4 * h + 2 * h  # per norm: fp32 input, fp32 normalised, fp32 residual sum; bf16 output
    attention = 2 * (q + kv + out + latent) + 4 * nh
    if config.qk_norm != "none":
        attention += 2 * 4 * (q + kv // 2)  # fp32 input and normalised output of the query and key norms
    k, inter = config.num_experts_per_tok, config.moe_intermediate_size
    moe = 2 * k * (h + 3 * inter + h) + 2 * 4 * config.num_experts + 2 * 3 * config.shared_width
    dense_mlp = 2 * 3 * config.intermediate_size
    n_moe = len(config.moe_layers)
    n_dense = config.num_hidden_layers - n_moe
    base = 2 * norm + attention
    layers = config.num_hidden_layers * base + n_moe * moe + n_dense * dense_mlp
    largest = base + max(moe if n_moe else 0, dense_mlp if n_dense else 0)
    return layers, largest, 4 * h


def random_init_in_host_memory(params: int) -> bool:
    """Whether a random initialisation of a model of ``params`` parameters is built in host memory before it
    moves to the GPU: models under ``SEEDED_INIT_MIN_PARAMS`` are (``MoEForCausalLM(config)`` on the CPU), larger
    ones are filled on the GPU directly (training/module.py ``random_model``)."""
    from moetrain.models.random_init import SEEDED_INIT_MIN_PARAMS

    return params < SEEDED_INIT_MIN_PARAMS


def _machine() -> tuple[Optional[int], Optional[int]]:
    gpu = torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        host = None
    return gpu, host


def _slots(off: OffloadConfig, record: int, total_experts: int) -> int:
    """Device state slots, as the optimizer sizes them: what ``gpu_budget_gb`` holds, capped."""
    return max(1, min(int(off.gpu_budget_gb * GiB) // record, total_experts, off.gpu_slots or total_experts))


def make_plan(model_config: ModelConfig, offload_config: OffloadConfig, tokens_per_step: int,
              gpu_capacity: Optional[int] = None, host_capacity: Optional[int] = None,
              disk_free: Optional[int] = None, link_gbps: Optional[float] = None,
              compute_tflops: float = DEFAULT_COMPUTE_TFLOPS, weight_bytes: Optional[int] = None,
              micro_batch_tokens: Optional[int] = None, layerwise_grads: bool = False,
              streamed_load: bool = False, activation_checkpointing: bool = False,
              from_checkpoint: Optional[bool] = None, storage: Optional[Storage] = None) -> Plan:
    """Plan ``model_config`` under ``offload_config`` for ``tokens_per_step`` tokens per optimizer step.

    Args:
        gpu_capacity / host_capacity / disk_free: bytes; default to this machine's (GPU memory, physical
            host memory, free space at nvme_path). ``disk_free`` is the disk of the run: the ``init_from``
            directory, the checkpoints and the swap (unless ``storage.swap_separate``).
        link_gbps: defaults to the measured both-directions rate of the GPU machines (93 GB/s).
        weight_bytes: size of an offloaded expert's resident compute weight and of its gradient; by default
            from ``compute_dtype`` (``auto`` is bf16 on a GPU: 2; ``fp32``: 4).
        micro_batch_tokens: tokens of one forward/backward, for the activation estimate (default: the step's).
        layerwise_grads: the engine steps each MoE layer and frees its expert gradients under backward
            (``accumulate_grad_batches == 1``, ``max_grad_norm == 0``, ``step_on: gpu``), so only the
            largest layer's expert gradients are counted.
        streamed_load: the model starts from ``init_from`` and the experts' masters stream into the tier, so the
            load peak is fp32 dense + ``weight_bytes`` per expert parameter (ignored with tier ``none``: that
            loads the whole model in fp32).
        activation_checkpointing: decoder layers recomputed in backward (``model.activation_checkpointing``).
        from_checkpoint: the model starts from ``init_from`` (with any tier); None: as ``streamed_load``. False
            is a random initialisation, built in fp32 in host memory first when it is small
            (:func:`random_init_in_host_memory`), on the GPU otherwise.
        storage: the ``init_from`` directory, the checkpoints and where the swap lives (:func:`recipe_storage`);
            None: nothing on disk but the swap, and no checkpoint saves.
    """
    dense, expert, per_expert = count_parameters(model_config)
    n_moe = len(model_config.moe_layers)
    e, k = model_config.num_experts, model_config.num_experts_per_tok
    total_experts = n_moe * e
    storage = storage if storage is not None else Storage()
    gpu_cap, host_cap = _machine()
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
    state = record * total_experts
    micro = micro_batch_tokens if micro_batch_tokens is not None else tokens_per_step
    rows: list[tuple[str, str, int]] = [("gpu", "dense weights, grads, AdamW moments (fp32)", 16 * dense),
                                        ("gpu", "dense matrices: bf16 autocast copies", 2 * dense)]
    hot, host, nvme, layerwise = 0, 0, 0, False
    if off.tier == "none":
        rows.append(("gpu", "experts: weights, grads, moments (fp32)", 16 * expert))
    else:
        layerwise = layerwise_grads
        slots = _slots(off, record, total_experts)
        grads = expert // n_moe if layerwise else expert  # every MoE layer has the same experts
        if paged_weights:  # two layer-sized device buffers; the weights' home is host memory
            rows.append(("gpu", f"experts: paged compute weights, 2 layer buffers ({weight_bytes} B/param)",
                         weight_buffers))
        else:
            rows.append(("gpu", f"experts: resident compute weights ({weight_bytes} B/param)", weight_bytes * expert))
        rows += [("gpu", f"experts: gradients of {'one layer' if layerwise else 'every expert'} "
                         f"({weight_bytes} B/param)", weight_bytes * grads),
                 ("gpu", f"expert state slots ({slots} x {record / 2**20:.1f} MiB)", slots * record)]
        if off.tier == "cpu":
            budget = None if off.cpu_budget_gb is None else int(off.cpu_budget_gb * GiB)
            host = state if budget is None else min(state, budget // record * record)
        nvme = state - host
        staging = slots * record if nvme else 0
    recomputed = ", layers recomputed" if activation_checkpointing else ""
    rows += [("gpu", f"activations, {micro} tokens a micro-batch (estimate{recomputed})",
              activation_bytes(model_config, micro, activation_checkpointing)),
             ("gpu", "CUDA context, allocator slack (reserve)", GPU_RESERVE)]
    if off.tier != "none":
        # the cache comes last: with hot_cache_gb null it takes what the GPU has left
        used = sum(n for tier, _, n in rows if tier == "gpu")
        if off.hot_cache_gb is None:
            spare = 0 if gpu_capacity is None else max(0, gpu_capacity - used)
        else:
            spare = int(off.hot_cache_gb * GiB)
        hot = min(total_experts, spare // record)
        rows.append(("gpu", f"hot-expert state cache ({hot} x {record / 2**20:.1f} MiB)", hot * record))
        rows.append(("host", "expert state (pinned)", host))
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
    pinned = " next to the pinned expert state" if off.tier != "none" else ""
    if from_checkpoint:
        host_load = host + storage.load_shard_bytes
        host_load_what = (f"init_from is read one shard at a time ({storage.load_shard_bytes / GiB:.2f} GiB)"
                          + (pinned or " onto the GPU"))
    elif random_init_in_host_memory(dense + expert):
        host_load = host + LOAD_BYTES_PER_PARAM * (dense + expert)
        host_load_what = ("random init builds the fp32 model in host memory first "
                          f"({LOAD_BYTES_PER_PARAM * (dense + expert) / GiB:.2f} GiB)" + (pinned and "," + pinned))
    else:
        host_load = host
        host_load_what = "random init builds the fp32 model on the GPU (no host copy)" + (
            ": host memory holds the pinned expert state" if pinned else "")
    one = checkpoint_bytes(dense, expert, off)
    if storage.checkpoints:
        rows.append(("host", f"checkpoint save: {SAVE_SHARDS_IN_FLIGHT} shards in flight "
                             f"(max_shard_mb {storage.max_shard_bytes // 2**20})",
                     SAVE_SHARDS_IN_FLIGHT * min(storage.max_shard_bytes, one)))
        if storage.async_save:  # the dense part is copied (experts too with tier none); expert state is read in place
            snapshot = dense if off.tier != "none" else dense + expert
            rows.append(("host", "checkpoint.async: host copy of fp32 weights + moments", 12 * snapshot))
        host = sum(n for tier, _, n in rows if tier == "host")
    disk_notes = []
    if storage.model_dir_what:
        rows.append(("disk", storage.model_dir_what, storage.model_dir_bytes))
    if storage.checkpoints:
        rows.append(("disk", f"checkpoints: {storage.checkpoints} x {one / GiB:.2f} GiB", storage.checkpoints * one))
        moments = "fp32" if off.tier == "none" else off.moments
        disk_notes.append(f"checkpoints: {storage.checkpoints_what}; each holds fp32 weights "
                          f"({4 * (dense + expert) / GiB:.2f} GiB) and the AdamW moments (fp32 dense, "
                          f"{moments} experts: {(one - 4 * (dense + expert)) / GiB:.2f} GiB)")
    disk = sum(n for tier, _, n in rows if tier == "disk")
    gpu = sum(n for tier, _, n in rows if tier == "gpu")
    if disk_free is None and nvme and not storage.swap_separate and off.nvme_path and os.path.isdir(off.nvme_path):
        disk_free = shutil.disk_usage(off.nvme_path).free
    active_per_layer = e * (1.0 - (1.0 - 1.0 / e) ** (tokens_per_step * k))
    active = n_moe * active_per_layer
    paged = active * (1.0 - hot / total_experts) if off.tier != "none" else 0.0
    moved = 2.0 * bpp * per_expert * paged
    if paged_weights:
        # every micro-batch pages in its active experts' weights for forward and again for backward; the
        # step writes the new weights of the step's active experts back
        micro_batches = max(1, math.ceil(tokens_per_step / micro))
        active_micro = n_moe * e * (1.0 - (1.0 - 1.0 / e) ** (micro * k))
        moved += weight_bytes * per_expert * (2.0 * micro_batches * active_micro + active)
    link = link_gbps if link_gbps is not None else DEFAULT_DUPLEX_GBPS
    streamed = streamed_load and off.tier != "none"
    active_params_per_token = dense + n_moe * k * per_expert
    compute_s = 6.0 * active_params_per_token * tokens_per_step / (compute_tflops * 1e12)
    return Plan(tier=off.tier, gpu_bytes=gpu, host_bytes=host, nvme_bytes=nvme, gpu_capacity=gpu_capacity,
                host_capacity=host_capacity, disk_free=disk_free, expert_params=expert, dense_params=dense,
                active_experts=active, total_experts=total_experts, moved_bytes=moved, link_gbps=link,
                compute_s=compute_s, transfer_s=moved / (link * 1e9), breakdown=rows,
                gpu_load_bytes=load_peak_bytes(dense, expert, weight_bytes, streamed,
                                               weight_buffers if paged_weights else None),
                master=off.master,
                moments=off.moments, state_bpp=bpp, record_bytes=record, hot_cache_experts=hot,
                hot_cache_auto=off.hot_cache_gb is None, paged_experts=paged, layerwise_grads=layerwise,
                streamed_load=streamed, weight_bytes=weight_bytes, paged_weights=paged_weights,
                host_load_bytes=host_load, host_load_what=host_load_what, disk_bytes=disk, disk_notes=disk_notes,
                swap_separate=storage.swap_separate, swap_free=storage.swap_free)


def load_peak_bytes(dense: int, expert: int, weight_bytes: int, streamed: bool,
                    paged_buffer_bytes: Optional[int] = None) -> int:
    """GPU bytes while the model loads: the dense part in fp32, and the routed experts in fp32 too unless their
    masters stream into the tier (``init_from`` with a tier), in which case only their compute weights
    (``weight_bytes`` per parameter) are on the GPU; with paged weights not even those: only the pager's
    ``paged_buffer_bytes`` of device buffers."""
    if streamed and paged_buffer_bytes is not None:
        return LOAD_BYTES_PER_PARAM * dense + paged_buffer_bytes
    return LOAD_BYTES_PER_PARAM * dense + (weight_bytes if streamed else LOAD_BYTES_PER_PARAM) * expert


def checkpoint_bytes(dense: int, expert: int, offload: OffloadConfig) -> int:
    """Bytes of one checkpoint's tensors (training/checkpoint.py, training/optimizer_state.py): every weight in
    fp32 (the offloaded experts' masters are decoded to fp32 whatever their stored format), the dense AdamW
    moments in fp32 (8 B/param), and the routed experts' moments as the store keeps them (fp32 8 B, bf16 4 B,
    int8 2 B plus one fp32 scale a block of each). The configs, trainer state and tokenizer copy are kilobytes
    to megabytes and are left out."""
    if offload.tier == "none":
        moments = 8.0
    else:
        moments = state_bytes_per_param("fp32", offload.moments, offload.quant_block) - 4
    return LOAD_BYTES_PER_PARAM * (dense + expert) + 8 * dense + math.ceil(moments * expert)


def checkpoints_on_disk(every_n_steps: int, max_steps: Optional[int], save_final: bool,
                        keep_last: int) -> tuple[int, str]:
    """(checkpoints on disk at once, why) for a run's ``checkpoint`` section and ``trainer.max_steps``.

    A save writes the new checkpoint completely before the ones older than the ``keep_last`` newest are deleted
    (a process killed at any moment leaves a complete one), so rotation keeps ``keep_last + 1`` at the peak;
    without rotation (``keep_last: 0``) every save of the run stays: one every ``every_n_steps`` steps and the
    final one (skipped when the last step saved already). The save on a signal ends the run, so it is one of
    these.
    """
    bounded = max_steps is not None and max_steps > 0
    periodic = max_steps // every_n_steps if every_n_steps and bounded else 0
    final = save_final and not (periodic and max_steps % every_n_steps == 0)
    saves = periodic + final
    schedule = " and ".join(([f"every {every_n_steps} of {max_steps} steps"] if periodic else [])
                            + (["the final one"] if final else []))
    if every_n_steps and not bounded:
        if keep_last:
            return keep_last + 1, (f"every {every_n_steps} steps, keep_last {keep_last}: the newest is written "
                                   "before the oldest goes")
        return 1, (f"every {every_n_steps} steps of an unbounded run (trainer.max_steps) and keep_last 0: every one "
                   "stays, counted once here; set checkpoint.keep_last")
    if keep_last and saves > keep_last:
        return keep_last + 1, (f"{saves} saves ({schedule}), keep_last {keep_last}: the newest is written before "
                               "the oldest goes")
    if saves == 0:
        return 0, "none (every_n_steps 0, save_final false)"
    if saves == 1:
        return 1, f"1 saved ({schedule})"
    return saves, f"{saves} saved ({schedule}), " + (f"keep_last {keep_last}" if keep_last else "keep_last 0: all kept")


# ---------------------------------------------------------------------------------------------- largest model
@dataclass(frozen=True)
class Machine:
    """Capacities of one GPU and its host, in bytes (None: unknown)."""

    gpu: Optional[int]
    host: Optional[int]
    disk: Optional[int]

    def describe(self) -> str:
        def gib(n: Optional[int]) -> str:
            return "unknown" if n is None else f"{n / GiB:.0f} GiB"
        return f"GPU {gib(self.gpu)}, host {gib(self.host)}, disk {gib(self.disk)}"


@dataclass(frozen=True)
class FitChoice:
    """One way to place a model's state on a machine, and its plan.

    Attributes:
        tier: ``cpu`` (all expert state in host memory) or ``cpu+nvme`` (host memory, overflow on NVMe).
        master / moments: the state formats. layerwise_grads: needs accumulation 1, no clipping, step_on gpu.
    """

    tier: str
    master: str
    moments: str
    layerwise_grads: bool
    plan: Plan
    paged_weights: bool = False

    def describe(self) -> str:
        where = "host memory" if self.tier == "cpu" else "host memory + NVMe"
        grads = ("; expert gradients freed layer by layer (accumulate_grad_batches 1, max_grad_norm 0, "
                 "step_on gpu)" if self.layerwise_grads else "")
        paged = "; compute weights paged from host memory (resident_weights no)" if self.paged_weights else ""
        return f"expert state in {where}, master {self.master}, moments {self.moments}{grads}{paged}"


def fit_options(model_config: ModelConfig, machine: Machine, micro_batch_tokens: int = 4096,
                gpu_budget_gb: float = 1.0, streamed_load: bool = True) -> list[FitChoice]:
    """Every placement the search weighs, in order of preference, each with its plan.

    Preference: compute weights resident on the GPU before paged from host memory (slower: they cross the
    link every micro-batch); gradients of every expert (any accumulation, clipping allowed) before layer-wise
    freeing; then the most exact state (masters outer, moments inner: :data:`MASTERS`, :data:`MOMENTS`); then
    host memory alone before an overflow to NVMe (slower). The overflow's host budget is what the host has
    after everything else it holds at its peak, at load or in training (:data:`HOST_RESERVE`, the NVMe staging
    buffers, paged weights, a shard being read or saved). ``gpu_budget_gb``: device slots for state being
    stepped (1 GiB, as the DeepSeek-MoE-16B recipe: about ten experts' fp32 state). ``streamed_load``: a
    fine-tune starts from a checkpoint (``init_from``) whose experts' masters stream into the tier, so the
    load peak is fp32 dense + bf16 experts (False: random initialisation, the whole model in fp32). The disk
    holds what such a run needs (:func:`search_storage`): the downloaded model, the swap and one checkpoint.
    """
    out = []
    storage = search_storage(model_config, streamed_load)
    for paged, layerwise in itertools.product((False, True), (False, True)):
        for master in MASTERS:
            for moments in MOMENTS:
                base = OffloadConfig(tier="cpu", master=master, moments=moments, gpu_budget_gb=gpu_budget_gb,
                                     resident_weights="no" if paged else "auto")
                plan_of = partial(make_plan, model_config, tokens_per_step=micro_batch_tokens,
                                  gpu_capacity=machine.gpu, host_capacity=machine.host, disk_free=machine.disk,
                                  micro_batch_tokens=micro_batch_tokens, layerwise_grads=layerwise,
                                  streamed_load=streamed_load, storage=storage)
                choices = [("cpu", plan_of(base))]
                if machine.host is not None:
                    # every expert's state on NVMe: what the host holds besides the state, at its higher peak
                    swapped = plan_of(replace(base, cpu_budget_gb=0.0))
                    budget = machine.host - max(swapped.host_bytes, swapped.host_load_bytes)
                    if budget > 0:
                        choices.append(("cpu+nvme", plan_of(replace(base, cpu_budget_gb=budget / GiB))))
                out += [FitChoice(tier, master, moments, layerwise, plan, paged) for tier, plan in choices]
    return out


def search_storage(model_config: ModelConfig, streamed_load: bool = True) -> Storage:
    """The disk of a fine-tune in the largest-preset search: the model downloaded from Hugging Face (bf16) when it
    starts from ``init_from`` (``streamed_load``), and one checkpoint (``save_final``, the default shards)."""
    total = model_config.param_counts()["total"]
    model_dir = ("model directory (init_from: the preset in bf16, as downloaded)", 2 * total) if streamed_load \
        else ("", 0)
    return Storage(model_dir_what=model_dir[0], model_dir_bytes=model_dir[1], checkpoints=1,
                   checkpoints_what="the final one")


def best_fit(model_config: ModelConfig, machine: Machine, micro_batch_tokens: int = 4096) -> Optional[FitChoice]:
    """The first placement of :func:`fit_options` under which every tier fits, or None."""
    return next((c for c in fit_options(model_config, machine, micro_batch_tokens) if c.plan.fits_all()), None)


def presets() -> list[ModelConfig]:
    """Every preset under ``configs/models/``, largest first."""
    configs = [ModelConfig.from_preset(p.stem) for p in sorted(CONFIGS_DIR.glob("*.yaml"))]
    return sorted(configs, key=lambda c: -c.param_counts()["total"])


def largest_preset(machine: Machine, micro_batch_tokens: int = 4096
                   ) -> list[tuple[ModelConfig, Optional[FitChoice]]]:
    """Each preset, largest first, with the placement under which it fits one GPU of ``machine`` (or None).
    The first entry with a placement is the answer."""
    return [(config, best_fit(config, machine, micro_batch_tokens)) for config in presets()]


def _largest_answer(results: list[tuple[ModelConfig, Optional[FitChoice]]]) -> Optional[tuple[ModelConfig, FitChoice]]:
    return next(((c, f) for c, f in results if f is not None), None)


def largest_line(machine: Machine, micro_batch_tokens: int) -> str:
    """One line for the plan printout: the largest preset one GPU of ``machine`` fully fine-tunes."""
    if machine.gpu is None:
        return ("largest preset one GPU here fully fine-tunes: GPU capacity unknown here (no CUDA); "
                "ask with --gpu-gb=N --host-gb=N --disk-gb=N")
    answer = _largest_answer(largest_preset(machine, micro_batch_tokens))
    if answer is None:
        return f"largest preset one GPU fully fine-tunes ({machine.describe()}): none"
    config, choice = answer
    return (f"largest preset one GPU fully fine-tunes ({machine.describe()}, {micro_batch_tokens} tokens a "
            f"micro-batch): {config.name} ({config.param_counts()['total'] / 1e9:.1f} B), {choice.describe()}")


def format_largest(machine: Machine, micro_batch_tokens: int) -> str:
    """What ``moetrain plan --largest`` prints: every preset's verdict, then the answer's plan."""
    results = largest_preset(machine, micro_batch_tokens)
    lines = [f"Full fine-tuning on one GPU: {machine.describe()}; {micro_batch_tokens} tokens a micro-batch; "
             "starting from a checkpoint (init_from: the experts' masters streamed into the tier); the disk holds "
             "the download (bf16), the swap and one checkpoint.", ""]
    for config, choice in results:
        size = f"{config.param_counts()['total'] / 1e9:7.2f} B"
        if choice is None:
            # the most frugal placements: of the GPU (paged weights, last) and of the host (resident weights)
            options = fit_options(config, machine, micro_batch_tokens)
            frugal = {"resident": [c for c in options if not c.paged_weights][-1].plan, "paged": options[-1].plan}
            short = {k: "+".join(t for t, ok in p.fits().items() if ok is not True) for k, p in frugal.items()}
            lines.append(f"  {config.name:<18} {size}  does not fit (the most compact placement overflows "
                         f"{short['resident']} with resident weights; {short['paged']} with paged weights)")
        else:
            lines.append(f"  {config.name:<18} {size}  fits: {choice.describe()}")
    answer = _largest_answer(results)
    lines.append("")
    if answer is None:
        lines.append("No preset fits one GPU of this machine.")
        return "\n".join(lines)
    config, choice = answer
    lines += [f"Largest: {config.name}, {choice.describe()}.", "", choice.plan.format()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- moetrain plan
def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):  # absent or null (``offload:`` with no keys)
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def recipe_training(recipe: dict[str, Any]) -> dict[str, Any]:
    """What the planner needs from a recipe besides the model: tokens per micro-batch and per step, whether
    expert gradients are freed layer by layer (accumulation 1, no clipping, GPU step path), and whether the
    model loads by streaming the experts' masters into their tier (``init_from`` with tier cpu or nvme)."""
    from moetrain.optim import OptimizerConfig

    model = recipe.get("model") or {}
    data = recipe.get("data") or {}
    micro = int(data.get("micro_batch_size", 1)) * int(data.get("seq_len", 2048))
    accumulation = int(model.get("accumulate_grad_batches", 1))
    clip = float((model.get("optimizer") or {}).get("max_grad_norm", OptimizerConfig().max_grad_norm))
    offload = model.get("offload") or {}
    step_on = offload.get("step_on", OffloadConfig().step_on)
    return {"tokens_per_step": micro * accumulation, "micro_batch_tokens": micro,
            "layerwise_grads": accumulation == 1 and clip == 0 and step_on == "gpu",
            "streamed_load": bool(model.get("init_from")) and offload.get("tier", OffloadConfig().tier) != "none",
            "from_checkpoint": bool(model.get("init_from")),
            "activation_checkpointing": bool(model.get("activation_checkpointing", False))}


def plan_from_recipe(recipe: dict[str, Any], **machine: Any) -> Plan:
    """The plan of a recipe (the parsed YAML with overrides applied); ``machine``: make_plan's capacities
    (``disk_free``: see :func:`recipe_storage`)."""
    offload = OffloadConfig(**((recipe.get("model") or {}).get("offload") or {}))
    config = recipe_model(recipe)[0]
    storage, disk_free = recipe_storage(recipe, config, machine.pop("disk_free", None))
    return make_plan(config, offload, **recipe_training(recipe), **machine, disk_free=disk_free, storage=storage)


CHECKPOINT_DEFAULTS = {"every_n_steps": 0, "max_shard_mb": DEFAULT_SHARD_MB, "save_final": True, "keep_last": 0,
                       "async": False}
"""The ``checkpoint`` section's defaults (``CheckpointCallback``'s signature; a test keeps them equal)."""


def _existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (a folder the run has not made yet is made there)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _same_filesystem(a: Path, b: Path) -> bool:
    return os.stat(_existing(a)).st_dev == os.stat(_existing(b)).st_dev


def recipe_storage(recipe: dict[str, Any], model_config: ModelConfig,
                   disk_free: Optional[int] = None) -> tuple[Storage, Optional[int]]:
    """(what a recipe's run puts on disk, the free bytes of the run's disk).

    The ``init_from`` directory counts its safetensors when it is here, and the preset in bf16 (what a Hugging
    Face download holds) when it is not; the checkpoints as :func:`checkpoints_on_disk` counts them, from the
    ``checkpoint`` section and ``trainer.max_steps``. With ``disk_free`` given (``--disk-gb``) it is one disk, free
    before the download, that holds all of it. Measured here instead, it is the filesystem of the run directory
    (``trainer.default_root_dir``, or the nearest folder above it that exists): an ``init_from`` directory already
    on it is in its used space and is not counted again, and a swap folder (``model.offload.nvme_path``) on
    another filesystem is the separate ``nvme`` tier, with that filesystem's free space.
    """
    model = recipe.get("model") or {}
    trainer = recipe.get("trainer") or {}
    offload = model.get("offload") or {}
    section = {**CHECKPOINT_DEFAULTS, **(recipe.get("checkpoint") or {})}
    kept, why = checkpoints_on_disk(int(section["every_n_steps"]), trainer.get("max_steps", -1),
                                    bool(section["save_final"]), int(section["keep_last"]))
    run_dir = Path(trainer.get("default_root_dir") or ".")
    measured = disk_free is None
    init_from, model_dir, shard = model.get("init_from"), ("", 0), HF_SHARD_BYTES
    if init_from and Path(init_from).is_dir():
        sizes = [f.stat().st_size for f in Path(init_from).rglob("*.safetensors")]
        shard = max(sizes, default=HF_SHARD_BYTES)
        if not measured:
            model_dir = ("init_from directory (its safetensors)", sum(sizes))
        elif _same_filesystem(Path(init_from), run_dir):
            model_dir = ("init_from directory (on this disk already: used space)", 0)
        else:
            model_dir = ("init_from directory (on another filesystem)", 0)
    elif init_from:
        download = 2 * model_config.param_counts()["total"]
        shard = min(HF_SHARD_BYTES, download)
        if measured and not _same_filesystem(Path(init_from), run_dir):
            model_dir = ("init_from directory, not here yet (on another filesystem)", 0)
        else:
            model_dir = ("init_from directory, not here yet (the preset in bf16)", download)
    swap = offload.get("nvme_path")
    separate = bool(measured and swap and not _same_filesystem(Path(swap), run_dir))
    if measured:
        disk_free = shutil.disk_usage(_existing(run_dir)).free
    storage = Storage(model_dir_bytes=model_dir[1], model_dir_what=model_dir[0], load_shard_bytes=shard,
                      checkpoints=kept, checkpoints_what=why, max_shard_bytes=int(section["max_shard_mb"]) * 2**20,
                      async_save=bool(section["async"]), swap_separate=separate,
                      swap_free=shutil.disk_usage(_existing(Path(swap))).free if separate else None)
    return storage, disk_free


def recipe_model(recipe: dict[str, Any]) -> tuple[ModelConfig, Optional[str]]:
    """(the model shape a recipe trains, a one-line note or None).

    ``init_from``'s config when the directory is here; when it is not (planning before the download) and the
    recipe also names ``model.preset``, the preset's shape, with a note saying so. The load peak is still the
    one of ``init_from`` (:func:`recipe_training` decides it from the recipe, not from the files).

    Raises:
        ConfigError: no model named, ``init_from`` missing without a preset, or ``model.config`` overrides
            next to ``init_from`` (the checkpoint fixes the shape, as ``moetrain fit`` says too).
    """
    from moetrain.config import ConfigError

    model = recipe.get("model") or {}
    init_from, preset = model.get("init_from"), model.get("preset")
    if init_from and Path(init_from).exists():
        from moetrain.models.hf import load_config, resolve_checkpoint

        if (Path(init_from) / "checkpoints").is_dir():  # a run directory: its newest checkpoint, as fit takes it
            init_from = str(resolve_checkpoint(init_from, init_from))
        return load_config(init_from), None
    if init_from:
        if not preset:
            raise ConfigError(f"model.init_from {init_from} does not exist; download the model there, or name its "
                              "shape with model.preset to plan before the download")
        if model.get("config"):
            raise ConfigError("model.config overrides cannot be combined with model.init_from (the checkpoint fixes "
                              "the shape); remove model.config")
        note = (f"note: model.init_from {init_from} is not here; the shape is preset {preset}'s, loaded as "
                "init_from would load it")
        return ModelConfig.from_preset(preset), note
    if not preset:
        raise ConfigError("the recipe names no model: set model.preset (or model.init_from)")
    return ModelConfig.from_preset(preset, **(model.get("config") or {})), None


USAGE = ("usage: moetrain plan --config RECIPE | --preset=NAME | --largest [--section.key=value ...] "
         "[--gpu-gb=N] [--host-gb=N] [--disk-gb=N] [--tokens=N] [--link_gbps=GBPS] [--world_sizes=1,8,64]")
MACHINE_FLAGS = {"--gpu-gb": "gpu_capacity", "--host-gb": "host_capacity", "--disk-gb": "disk_free"}
HELP = f"""{USAGE}

Print the memory plan of a recipe on one GPU of this machine (where weights, gradients, optimizer
state and activations live, against each tier's capacity), the largest preset this machine's GPU
fully fine-tunes, and the memory per GPU under expert parallelism.

  -c, --config RECIPE   the recipe YAML to plan (as given to 'moetrain fit --config')
  --preset=NAME         plan a model shape under configs/models/ with the default settings instead
  --largest             every preset's verdict on this machine (or the one the flags below describe)
  --section.key=value   a recipe override, as on 'moetrain fit' (e.g. --model.offload.tier=cpu)
  --gpu-gb=N, --host-gb=N, --disk-gb=N
                        plan for another machine: GPU memory, host memory and free disk in GiB
                        (default: this machine's)
  --tokens=N            tokens a micro-batch for the largest-preset verdicts (default: the recipe's
                        data.micro_batch_size x data.seq_len; 4096 with --largest)
  --link_gbps=GBPS      host<->GPU link rate, both directions at once, of the step-time floor
                        (default: 93 GB/s, measured on the GPU machines)
  --world_sizes=1,8,64  GPU counts of the expert-parallel table
  -h, --help            show this help and exit"""


def main(argv: list[str]) -> int:
    """``moetrain plan``: print the one-GPU plan of a recipe (or preset) and the largest preset this machine's
    GPU fully fine-tunes, then the memory per GPU under expert parallelism; or, with ``--largest``, every
    preset's verdict. ``--gpu-gb/--host-gb/--disk-gb`` (GiB) ask about another machine."""
    import yaml

    from moetrain.offload.plan_parallel import plan_expert_parallel

    config_path, overrides, machine, preset, largest, tokens = None, {}, {}, None, False, None
    world_sizes: tuple[int, ...] = (1, 8, 64)
    args = list(argv)
    try:
        while args:
            arg = args.pop(0)
            if arg in ("-h", "--help"):
                print(HELP)
                return 0
            name, eq, value = arg.partition("=")
            if name in ("-c", "--config", "--preset", *MACHINE_FLAGS, "--tokens") and not eq:
                if not args:
                    raise ValueError(f"{arg} needs a value")
                value = args.pop(0)
            if name in ("-c", "--config"):
                config_path = value
            elif name == "--preset":
                preset = value
            elif name == "--largest" and not eq:
                largest = True
            elif name == "--tokens":
                tokens = int(value)
            elif name in MACHINE_FLAGS:
                machine[MACHINE_FLAGS[name]] = int(float(value) * GiB)
            elif name == "--world_sizes" and eq:
                world_sizes = tuple(int(x) for x in value.split(",") if x)
            elif name == "--link_gbps" and eq:
                machine["link_gbps"] = float(value)
            elif name.startswith("--") and eq:
                overrides[name[2:]] = yaml.safe_load(value)
            else:
                raise ValueError(f"unexpected argument {arg!r}")
    except ValueError as err:
        print(f"moetrain plan: error: {err}; {USAGE}", file=sys.stderr)
        return 2
    gpu, host = _machine()
    here = Machine(gpu=machine.get("gpu_capacity", gpu), host=machine.get("host_capacity", host),
                   disk=machine.get("disk_free"))
    if largest:
        if here.disk is None:
            here = replace(here, disk=shutil.disk_usage(".").free)
        if here.gpu is None:
            print("moetrain plan: error: no CUDA GPU here; give the machine to plan for with --gpu-gb=N "
                  "(and --host-gb=N --disk-gb=N)", file=sys.stderr)
            return 2
        print(format_largest(here, tokens or 4096))
        return 0
    if config_path is None and preset is None:
        print(f"moetrain plan: error: give the recipe with --config RECIPE (or a model shape with --preset=NAME, "
              f"or --largest); {USAGE}", file=sys.stderr)
        return 2
    source = config_path or f"preset {preset}"
    try:
        recipe = yaml.safe_load(Path(config_path).read_text()) or {} if config_path else {"model": {"preset": preset}}
        for key, value in overrides.items():
            _set_dotted(recipe, key, value)
        plan = plan_from_recipe(recipe, **machine)
        if here.disk is None:
            nvme_path = ((recipe.get("model") or {}).get("offload") or {}).get("nvme_path")
            here = replace(here, disk=shutil.disk_usage(nvme_path if nvme_path and os.path.isdir(nvme_path)
                                                        else ".").free)
        micro = tokens or recipe_training(recipe)["micro_batch_tokens"]
        model_config, note = recipe_model(recipe)
        parallel = plan_expert_parallel(model_config, world_sizes, state_bytes=plan.state_bpp,
                                        state_label=f"master {plan.master}, moments {plan.moments}")
    except (OSError, ValueError, TypeError, yaml.YAMLError) as err:
        print(f"moetrain plan: error: {source}: {err}", file=sys.stderr)
        return 2
    if note:
        print(note)
    print(plan.format())
    print()
    print(largest_line(here, micro))
    print()
    print(parallel)
    return 0
