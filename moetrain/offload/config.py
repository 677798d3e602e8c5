"""Where the routed experts' optimizer state lives: the ``model.offload`` section of a recipe, and its one resolution.

A recipe writes :class:`OffloadSettings`, four groups of typed keys::

    model:
      offload:
        placement: {tier, gpu_budget_gb, cpu_budget_gb, gpu_slots, hot_cache_gb, resident_weights}
        nvme:      {path, backend, block_size, queue_depth, threads}
        state:     {master, moments, quant_block, compute_dtype}
        schedule:  {step_on, cpu_adam, idle_experts, prefetch}

:func:`resolve` checks every rule between the keys, once, and returns the flat :class:`OffloadPlan` that the engine,
the planner, the pre-flight checks and the checkpoint code read (``plan.tier``, ``plan.nvme_path``, ...). The
schedule itself (when a layer is stepped, how many slots the state gets) is :mod:`moetrain.offload.schedule`'s.

Keys of the flat section that recipes used before (``model.offload.tier``, ``nvme_path``, ``lookahead``, ...) are
refused with the key that replaced them: :data:`FLAT_TO_NESTED`, :func:`moved_key_message`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args, get_type_hints

from moetrain.config import ConfigError

SECTION = "model.offload"
MOVED_SEE = "see README, Real models"


@dataclass
class PlacementSettings:
    """Which memory holds the experts' state and weights (``model.offload.placement``)."""

    tier: Literal["none", "cpu", "nvme"] = "none"
    """``none`` keeps every expert's state on the compute device (the reference); ``cpu`` keeps master weights and
    Adam moments in pinned host memory; ``nvme`` keeps them in swap files under ``nvme.path``."""
    gpu_budget_gb: float = 4.0
    """Bytes of expert state the store may hold on the compute device (its slots of master+moments). The slot count
    comes from this budget alone, so it does not grow with the number of experts."""
    cpu_budget_gb: Optional[float] = None
    """Host memory for expert state under tier ``cpu``; records past it overflow to ``nvme.path`` (null: no limit)."""
    gpu_slots: Optional[int] = None
    """Cap on device state slots (null: as many as ``gpu_budget_gb`` holds, at most the number of experts)."""
    hot_cache_gb: Optional[float] = 0.0
    """Device memory that keeps the optimizer state of the most frequently routed experts resident between steps
    (no page-in or page-out while they stay hot), chosen from live routing statistics and revised every step. 0
    disables it; null sizes it from the device memory free after the first step."""
    resident_weights: Literal["yes", "no"] = "yes"
    """``yes`` keeps the experts' compute weights on the device; ``no`` keeps them in host memory and pages them in
    per layer and active expert, forward and backward, into two layer-sized device buffers (whatever the number of
    layers). ``no`` saves the resident weights' device memory and moves 2 bytes a parameter of every active expert
    over the link twice per micro-batch; it needs tier ``cpu`` or ``nvme`` and one process."""


@dataclass
class NvmeSettings:
    """Swap files on a fast disk, for tier ``nvme`` or past ``placement.cpu_budget_gb`` (``model.offload.nvme``)."""

    path: Optional[str] = None
    """Folder for swap files (tier ``nvme``, or overflow past ``cpu_budget_gb``). Must exist and be writable."""
    backend: Literal["auto", "aio", "threads"] = "auto"
    """``auto`` (DeepSpeed async I/O when libaio is there, else threads with a warning), ``aio``, ``threads``."""
    block_size: int = 1 << 20
    """Bytes per async I/O request (DeepSpeed's default block size)."""
    queue_depth: int = 8
    """Outstanding async I/O requests per handle."""
    threads: int = 4
    """Worker threads of the pread/pwrite fallback."""


@dataclass
class StateSettings:
    """How the offloaded experts' state is stored, and the dtype they compute in (``model.offload.state``)."""

    master: Literal["fp32", "fp32_split", "bf16_sr", "bf16_kahan"] = "fp32"
    """Master weights: ``fp32`` (default, exact), ``fp32_split`` (exact, as bf16 + 16 bits; resident bf16 weights
    hold the bf16: a third less on the link), ``bf16_sr`` (bf16, stochastic rounding: 2 bytes) or ``bf16_kahan``
    (bf16 + Kahan compensation: 4 bytes)."""
    moments: Literal["fp32", "bf16", "int8"] = "fp32"
    """Adam moments: ``fp32`` (default, exact), ``bf16`` or ``int8`` (block-wise dynamic quantization as in 8-bit
    Adam, dequantized on the compute device: about 1 byte a moment)."""
    quant_block: int = 256
    """Elements per quantization block of ``moments: int8`` (each block keeps one fp32 absmax scale)."""
    compute_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """dtype of the routed experts' compute weights (and so of their gradients) when their master weights live in
    the store: ``auto`` (bf16 on CUDA, fp32 elsewhere), ``bf16`` or ``fp32``. bf16 halves the resident weights and
    gradients and the bytes the CPU step path moves; the fp32 master in the store is what AdamW updates and what
    checkpoints save."""


@dataclass
class ScheduleSettings:
    """Where and when offloaded experts are stepped (``model.offload.schedule``)."""

    step_on: Literal["gpu", "cpu", "auto"] = "gpu"
    """``gpu`` (state paged in, fused AdamW), ``cpu`` (``cpu_adam`` in host memory) or ``auto`` (both, split by
    measured rates; a timed step with every expert on the GPU keeps the faster: ``offload/auto_on_gpu``)."""
    cpu_adam: Literal["exact", "deepspeed"] = "exact"
    """CPU share's AdamW: exact (torch's fused CUDA AdamW's bits) or deepspeed (DeepSpeed's, an ulp off a step)."""
    idle_experts: Literal["skip", "dense"] = "skip"
    """``skip``: an expert that got no tokens is untouched (as AdamW with grad None). ``dense``: the zero-gradient
    steps a dense AdamW would have made are caught up when it is next routed, or at checkpoint time."""
    prefetch: bool = True
    """Page state in ahead of need: the forward's routing trace drives backward-time page-ins. The look-ahead (next
    layer's router on this layer's input) is measured always: offload/lookahead_precision and recall."""


@dataclass
class OffloadSettings:
    """Where the routed experts' optimizer state (and weights) live: placement, NVMe swap, state format, schedule."""

    placement: PlacementSettings = field(default_factory=PlacementSettings)
    """Which memory holds the experts' state and weights."""
    nvme: NvmeSettings = field(default_factory=NvmeSettings)
    """Swap files (tier nvme, or overflow past placement.cpu_budget_gb)."""
    state: StateSettings = field(default_factory=StateSettings)
    """Storage format of the state, and the experts' compute dtype."""
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    """Where and when offloaded experts are stepped."""

    @classmethod
    def from_dict(cls, section: Optional[dict[str, Any]]) -> OffloadSettings:
        """Settings from a recipe's ``model.offload`` mapping (plain YAML, as ``moetrain plan`` reads it).

        Raises:
            ConfigError: a key of the old flat section (naming its new place), an unknown key, or a group that is
                not a mapping.
        """
        section = dict(section or {})
        moved = moved_key_message(section)
        if moved:
            raise ConfigError(moved)
        groups = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - set(groups))
        if unknown:
            raise ConfigError(f"{SECTION}: unknown key(s) {', '.join(unknown)}; it holds {', '.join(groups)}")
        built = {}
        for name, values in section.items():
            if values is None:
                continue
            group = get_type_hints(cls)[name]
            if not isinstance(values, dict):
                raise ConfigError(f"{SECTION}.{name} must be a mapping of keys ({', '.join(_names(group))})")
            unknown = sorted(set(values) - set(_names(group)))
            if unknown:
                raise ConfigError(f"{SECTION}.{name}: unknown key(s) {', '.join(unknown)}; it holds "
                                  f"{', '.join(_names(group))}")
            if isinstance(values.get("resident_weights"), bool):  # YAML 1.1 reads a bare yes/no as a boolean
                values = {**values, "resident_weights": "yes" if values["resident_weights"] else "no"}
            built[name] = group(**values)
        return cls(**built)


def _names(group: type) -> list[str]:
    return [f.name for f in dataclasses.fields(group)]


FLAT_TO_NESTED: dict[str, str] = {
    # flat key (the resolved plan's attribute, and the old recipe key) -> its key in OffloadSettings
    **{k: f"placement.{k}" for k in _names(PlacementSettings)},
    "nvme_path": "nvme.path", "nvme_backend": "nvme.backend", "nvme_block_size": "nvme.block_size",
    "nvme_queue_depth": "nvme.queue_depth", "nvme_threads": "nvme.threads",
    **{k: f"state.{k}" for k in _names(StateSettings)},
    **{k: f"schedule.{k}" for k in _names(ScheduleSettings)},
}
"""Every key of the resolved plan, by the place a recipe writes it."""
DROPPED: dict[str, str] = {
    "lookahead": "the look-ahead's precision and recall are always measured (one small matmul a layer; prefetch "
                 "follows the routing trace): remove the key",
}
"""Keys of the old flat section that nothing replaces, and what to do instead."""
OLD_VALUES: dict[tuple[str, Any], str] = {("resident_weights", "auto"): "yes"}
"""(flat key, value) pairs that recipes wrote before, and the value that does the same now."""


def recipe_key(flat: str) -> str:
    """The recipe key of a plan attribute, for messages: ``recipe_key("nvme_path") == "model.offload.nvme.path"``."""
    return f"{SECTION}.{FLAT_TO_NESTED[flat]}"


def moved_key_message(section: dict[str, Any]) -> Optional[str]:
    """One paragraph for the first key of the old flat ``model.offload`` section in ``section`` (None when there is
    none), or for a value that is gone (``resident_weights: auto``), under the old key or the new one."""
    placement = section.get("placement") if isinstance(section.get("placement"), dict) else {}
    for key in section:
        if key in DROPPED:
            return f"{SECTION}.{key} is gone: {DROPPED[key]} ({MOVED_SEE})."
        if key in FLAT_TO_NESTED:
            message = f"{SECTION}.{key} moved: write {recipe_key(key)} ({MOVED_SEE})."
            if (key, section[key]) in OLD_VALUES:
                message += f" Its value {section[key]} is now {OLD_VALUES[key, section[key]]}."
            return message
    for (key, value), now in OLD_VALUES.items():
        if FLAT_TO_NESTED[key].startswith("placement.") and placement.get(key) == value:
            return (f"{recipe_key(key)}={value} is gone: write {recipe_key(key)}={now} (the same behaviour; "
                    f"{MOVED_SEE}).")
    return None


@dataclass
class OffloadPlan:
    """The resolved ``model.offload`` section, flat: what the engine, the planner, the pre-flight checks and the
    checkpoint code read. :func:`resolve` makes it from :class:`OffloadSettings` (recipes write those); engine tests
    and benchmarks may build it directly. Each attribute is the recipe key :data:`FLAT_TO_NESTED` names, with that
    key's meaning (see the settings classes)."""

    tier: str = "none"
    nvme_path: Optional[str] = None
    gpu_budget_gb: float = 4.0
    cpu_budget_gb: Optional[float] = None
    resident_weights: str = "yes"
    step_on: str = "gpu"
    cpu_adam: str = "exact"
    compute_dtype: str = "auto"
    master: str = "fp32"
    moments: str = "fp32"
    quant_block: int = 256
    hot_cache_gb: Optional[float] = 0.0
    idle_experts: str = "skip"
    prefetch: bool = True
    gpu_slots: Optional[int] = None
    nvme_backend: str = "auto"
    nvme_block_size: int = 1 << 20
    nvme_queue_depth: int = 8
    nvme_threads: int = 4


OffloadConfig = OffloadPlan
"""Internal: the resolved form (:class:`OffloadPlan`), the name engine code and tests build it by. Recipes and the
training module use :class:`OffloadSettings`."""


def _choices(group: type) -> dict[str, tuple[str, ...]]:
    return {name: get_args(hint) for name, hint in get_type_hints(group).items() if get_args(hint)
            and all(isinstance(a, str) for a in get_args(hint))}


def resolve(settings: OffloadSettings) -> OffloadPlan:
    """Check every rule of the ``model.offload`` section once and flatten it into the plan everything reads.

    Raises:
        ConfigError: naming the key (``model.offload.<group>.<key>``) and what to do.
    """
    flat: dict[str, Any] = {}
    for flat_key, nested in FLAT_TO_NESTED.items():
        group, key = nested.split(".")
        flat[flat_key] = getattr(getattr(settings, group), key)
    nested_to_flat = {nested: flat_key for flat_key, nested in FLAT_TO_NESTED.items()}
    for name, group in get_type_hints(OffloadSettings).items():
        for key, allowed in _choices(group).items():
            flat_key = nested_to_flat[f"{name}.{key}"]
            value = flat[flat_key]
            if value not in allowed:
                now = OLD_VALUES.get((flat_key, value))
                hint = f" ({value} is now {now})" if now else ""
                raise ConfigError(f"{recipe_key(flat_key)}={value!r}: choose one of {', '.join(allowed)}{hint}")
    plan = OffloadPlan(**flat)
    if plan.resident_weights == "no" and plan.tier == "none":
        raise ConfigError(f"{recipe_key('resident_weights')}=no pages compute weights from host memory: it needs "
                          f"{recipe_key('tier')}=cpu or nvme")
    if plan.tier == "nvme" and not plan.nvme_path:
        raise ConfigError(f"{recipe_key('tier')}=nvme needs {recipe_key('nvme_path')}=DIR (a folder on a fast disk)")
    if plan.gpu_budget_gb <= 0:
        raise ConfigError(f"{recipe_key('gpu_budget_gb')}={plan.gpu_budget_gb}: must be > 0")
    if plan.cpu_budget_gb is not None and plan.cpu_budget_gb < 0:
        raise ConfigError(f"{recipe_key('cpu_budget_gb')}={plan.cpu_budget_gb}: must be >= 0 (or null: no limit)")
    if plan.quant_block < 16 or plan.quant_block % 16:
        raise ConfigError(f"{recipe_key('quant_block')}={plan.quant_block}: must be a multiple of 16")
    if plan.hot_cache_gb is not None and plan.hot_cache_gb < 0:
        raise ConfigError(f"{recipe_key('hot_cache_gb')}={plan.hot_cache_gb}: must be >= 0 (or null for auto)")
    if plan.gpu_slots is not None and plan.gpu_slots < 1:
        raise ConfigError(f"{recipe_key('gpu_slots')}={plan.gpu_slots}: must be >= 1 (or null)")
    for key in ("nvme_block_size", "nvme_queue_depth", "nvme_threads"):
        if flat[key] < 1:
            raise ConfigError(f"{recipe_key(key)}={flat[key]}: must be >= 1")
    return plan


def resolve_section(section: Optional[dict[str, Any]]) -> OffloadPlan:
    """The plan of a recipe's ``model.offload`` mapping (plain YAML): :meth:`OffloadSettings.from_dict`, then
    :func:`resolve`."""
    return resolve(OffloadSettings.from_dict(section))


def settings_from_flat(**flat: Any) -> OffloadSettings:
    """:class:`OffloadSettings` from keyword arguments named as the plan's attributes (``tier="cpu",
    nvme_path=...``): for benchmarks and tools that take the knobs as flat options; :func:`resolve` it."""
    groups: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        group, name = FLAT_TO_NESTED[key].split(".")
        groups.setdefault(group, {})[name] = value
    return OffloadSettings.from_dict(groups)
