"""The planner's answer: :class:`Plan` (bytes per tier, whether they fit, the floor of a step) and how
``moetrain plan`` prints it; :func:`plan_overflows`, the lines a pre-flight check prints when it refuses a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from moetrain.offload.hot_cache_margin import HOT_CACHE_MARGIN_BYTES, HOT_CACHE_MARGIN_SHARE
from moetrain.offload.plan.assumptions import GiB
from moetrain.offload.state_format import state_bytes_per_param

AUTO_MARGIN = f"{HOT_CACHE_MARGIN_SHARE:.0%} + {HOT_CACHE_MARGIN_BYTES / GiB:g} GiB"
"""The automatic hot cache's margin as the plan prints it (the engine's, :mod:`moetrain.offload.hot_cache_margin`)."""


@dataclass
class Plan:
    """Bytes per tier and the step floor of one model under one offload config.

    Attributes:
        gpu_bytes / host_bytes / nvme_bytes: planned use of each tier while training (host: with a checkpoint
            save in flight; nvme: the swap, part of ``disk_bytes`` unless ``swap_separate``).
        gpu_load_bytes: the GPU peak while loading: fp32 dense + the experts at their compute-weight bytes when
            streamed (``streamed_load``: init_from, or a large random init, with a tier; ``load_source`` says
            which), else the whole model in fp32.
        host_load_bytes / host_load_what: the host peak while loading (the fp32 model of a random init, or one
            shard of ``init_from``, next to the pinned state), and how it comes about.
        disk_bytes: the run's disk: the ``init_from`` directory, the swap (unless ``swap_separate``) and the
            checkpoints on disk at once; disk_notes: lines that explain the disk rows.
        gpu_capacity / host_capacity / disk_free: what the machine has (None: unknown here); swap_free: the free
            bytes of the swap's own filesystem when ``swap_separate``.
        expert_params / dense_params: parameter counts; active_experts: expected per step, all layers.
        master / moments / state_bpp: the experts' state format and its bytes per parameter.
        record_bytes: one expert's state record as the store lays it (aligned).
        hot_record_bytes: a hot-cache slot: the record, less its master segment where the step reads the master
            from the compute weights.
        hot_cache_experts: experts whose state the GPU cache holds; hot_cache_auto: sized as the engine sizes it,
            from what the GPU has left after step 1 less a margin (:func:`.memory.auto_hot_cache_bytes`).
        paged_experts: expected active experts per step whose state is paged (not in the hot cache).
        layerwise_grads: only one MoE layer's expert gradients are live (stepped and freed under backward).
        paged_weights: the experts' compute weights live in host memory (``resident_weights: no``).
        moved_bytes: bytes over the link per step; link_gbps: the rate used; compute_s / transfer_s / floor_s.
        nvme_moved_bytes: bytes the NVMe swap reads and writes per step (together); nvme_gbps: the rate assumed;
            nvme_s: their time.
        breakdown: (tier, what, bytes) lines.
        trained_experts: routed experts that train (``model.train.routed_experts``), None: every one, as the
            plan of a recipe that trains them all; selection_source: where the count comes from.
        frozen_groups / frozen_dense_params: the dense ``model.train`` groups frozen and their parameters.
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
    hot_record_bytes: int = 0
    hot_cache_experts: int = 0
    hot_cache_auto: bool = False
    paged_experts: float = 0.0
    layerwise_grads: bool = False
    overlapped: bool = True
    streamed_load: bool = False
    load_source: str = "init_from"
    weight_bytes: int = 2
    paged_weights: bool = False
    host_load_bytes: int = 0
    host_load_what: str = ""
    disk_bytes: int = 0
    disk_notes: list[str] = field(default_factory=list)
    swap_separate: bool = False
    swap_free: Optional[int] = None
    trained_experts: Optional[int] = None
    selection_source: Optional[str] = None
    frozen_groups: tuple[str, ...] = ()
    frozen_dense_params: int = 0
    nvme_moved_bytes: float = 0.0
    nvme_gbps: float = 0.0
    nvme_s: float = 0.0

    def load_what(self) -> str:
        """How the load peak comes about, in words."""
        if self.streamed_load and self.paged_weights:
            return (f"{self.load_source} streams the experts' masters into the tier and their weights into host "
                    "memory: fp32 dense + two layers of experts")
        if self.streamed_load:
            return (f"{self.load_source} streams the experts' masters into the tier: fp32 dense + "
                    f"{self.weight_bytes} B/param experts")
        return "the whole model in fp32 (random init, or init_from without an offload tier)"

    @property
    def floor_s(self) -> float:
        """The slowest of compute, the host-GPU link and the NVMe swap where they overlap (``overlapped``); with
        clipping the state moves after backward: compute plus the slower of link and NVMe."""
        if not self.overlapped:
            return self.compute_s + max(self.transfer_s, self.nvme_s)
        return max(self.compute_s, self.transfer_s, self.nvme_s)

    @property
    def bound(self) -> str:
        """What sets the floor: ``compute``, ``link`` or ``nvme`` (``compute + link`` after backward)."""
        if not self.overlapped:
            return "compute + " + ("nvme" if self.nvme_s > self.transfer_s else "link")
        return max((self.compute_s, "compute"), (self.transfer_s, "link"), (self.nvme_s, "nvme"),
                   key=lambda t: t[0])[1]

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
        if self.trained_experts is not None:
            share = self.trained_experts / self.total_experts if self.total_experts else 1.0
            lines.append(f"routed experts training: {self.trained_experts} of {self.total_experts} ({100 * share:.0f}%"
                         + (f", {self.selection_source})" if self.selection_source else ")"))
        if self.frozen_groups:
            lines.append(f"dense frozen: {', '.join(self.frozen_groups)} ({count(self.frozen_dense_params)}: fp32 "
                         "weights, no gradients, no moments)")
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
            how = f"auto: what the GPU has left less {AUTO_MARGIN}" if self.hot_cache_auto else "hot_cache_gb"
            if self.hot_cache_auto and self.gpu_capacity is None:
                how = "auto: GPU capacity unknown here, sized at start-up"
            lines.append(f"  hot-expert state cache ({how}): {cache} of {self.total_experts} experts, "
                         f"{cache * self.hot_record_bytes / GiB:.2f} GiB")
        lines += ["", f"  active experts per step (expected): {self.active_experts:.0f} of {self.total_experts}"
                  + (f", {self.paged_experts:.0f} paged" if self.hot_cache_experts else ""),
                  f"  link: {self.moved_bytes / GiB:.3f} GiB per step at {self.link_gbps:.0f} GB/s -> "
                  f"{secs(self.transfer_s)};  compute: {secs(self.compute_s)}"]
        if self.nvme_moved_bytes:
            half = self.nvme_moved_bytes / 2 / GiB
            lines.append(f"  nvme: {half:.3f} GiB read + {half:.3f} GiB written per step at {self.nvme_gbps:g} GB/s "
                         f"(assumed; --nvme_gbps) -> {secs(self.nvme_s)}")
        lines.append(f"  floor of a step: {secs(self.floor_s)} ({self.bound}-bound)")
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

