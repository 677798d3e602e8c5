"""Where the routed experts' optimizer state lives: the ``model.offload`` section of a recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class OffloadConfig:
    """Placement of expert state; every field is a recipe key under ``model.offload``."""

    tier: str = "none"
    """``none`` keeps every expert's state on the compute device (the reference); ``cpu`` keeps master
    weights and Adam moments in pinned host memory; ``nvme`` keeps them in swap files under ``nvme_path``."""
    nvme_path: Optional[str] = None
    """Folder for swap files (tier ``nvme``, or overflow past ``cpu_budget_gb``). Must exist and be writable."""
    gpu_budget_gb: float = 4.0
    """Bytes of expert state the store may hold on the compute device (its slots of master+moments).
    The slot count comes from this budget alone, so it does not grow with the number of experts."""
    cpu_budget_gb: Optional[float] = None
    """Host memory for expert state under tier ``cpu``; records past it overflow to NVMe (None: no limit)."""
    resident_weights: str = "auto"
    """Keep experts' compute weights on the device (``auto``/``yes``, the default), or ``no``: keep them in
    host memory and page them in per layer and active expert, forward and backward, into two layer-sized
    device buffers (whatever the number of layers). ``no`` saves the resident weights' device memory and
    moves 2 bytes a parameter of every active expert over the link twice per micro-batch; it needs tier
    ``cpu`` or ``nvme`` and one process."""
    step_on: str = "gpu"
    """Where offloaded experts are stepped: ``gpu`` (state paged in, fused AdamW), ``cpu``
    (DeepSpeedCPUAdam in host memory, gradients down and weights up) or ``auto`` (both at once, split
    by a cost model fed with rates measured at start-up)."""
    compute_dtype: str = "auto"
    """dtype of the routed experts' compute weights (and so of their gradients) when their master
    weights live in the store: ``auto`` (bf16 on CUDA, fp32 elsewhere), ``bf16`` or ``fp32``. bf16
    halves the resident weights and gradients and the bytes the CPU step path moves; the fp32 master
    in the store is what AdamW updates and what checkpoints save."""
    master: str = "fp32"
    """How offloaded experts' master weights are stored: ``fp32`` (default, exact), ``bf16_sr`` (bf16 with
    stochastic rounding after each update: 2 bytes a parameter) or ``bf16_kahan`` (bf16 plus a bf16 Kahan
    compensation term carrying the rounding error: 4 bytes, close to fp32 accuracy)."""
    moments: str = "fp32"
    """How offloaded experts' Adam moments are stored: ``fp32`` (default, exact), ``bf16`` or ``int8``
    (block-wise dynamic quantization as in 8-bit Adam, dequantized on the compute device: about 1 byte
    a moment)."""
    quant_block: int = 256
    """Elements per quantization block of ``moments: int8`` (each block keeps one fp32 absmax scale)."""
    hot_cache_gb: Optional[float] = 0.0
    """Device memory that keeps the optimizer state of the most frequently routed experts resident
    between steps (no page-in or page-out while they stay hot), chosen from live routing statistics and
    revised every step. 0 disables it; null sizes it from the device memory free after the first step."""
    idle_experts: str = "skip"
    """``skip``: an expert that got no tokens is untouched (torch AdamW with grad None). ``dense``: the
    zero-gradient steps a dense AdamW would have applied are caught up exactly when the expert is next
    routed, or at checkpoint time."""
    prefetch: bool = True
    """Page state in ahead of need: routing trace of the forward drives backward-time page-ins."""
    lookahead: bool = True
    """Apply the next MoE layer's router to the current layer's input to predict its experts; the
    predictions feed prefetch, and their precision and recall are reported in telemetry."""
    gpu_slots: Optional[int] = None
    """Cap on device state slots (None: as many as ``gpu_budget_gb`` holds, at most the number of experts)."""
    nvme_backend: str = "auto"
    """``auto`` (DeepSpeed async I/O when libaio is there, else threads with a warning), ``aio``, ``threads``."""
    nvme_block_size: int = 1 << 20
    """Bytes per async I/O request (DeepSpeed's default block size)."""
    nvme_queue_depth: int = 8
    """Outstanding async I/O requests per handle."""
    nvme_threads: int = 4
    """Worker threads of the pread/pwrite fallback."""

    def __post_init__(self) -> None:
        choices = {"tier": ("none", "cpu", "nvme"), "resident_weights": ("auto", "yes", "no"),
                   "step_on": ("gpu", "cpu", "auto"), "compute_dtype": ("auto", "bf16", "fp32"),
                   "idle_experts": ("skip", "dense"), "master": ("fp32", "bf16_sr", "bf16_kahan"),
                   "moments": ("fp32", "bf16", "int8"),
                   "nvme_backend": ("auto", "aio", "threads")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.offload.{key}={getattr(self, key)!r}: choose one of {', '.join(allowed)}")
        if self.resident_weights == "no" and self.tier == "none":
            raise ValueError("model.offload.resident_weights=no pages compute weights from host memory: it needs "
                             "model.offload.tier=cpu or nvme")
        if self.tier == "nvme" and not self.nvme_path:
            raise ValueError("model.offload.tier=nvme needs model.offload.nvme_path=DIR (a folder on a fast disk)")
        if self.gpu_budget_gb <= 0:
            raise ValueError(f"model.offload.gpu_budget_gb={self.gpu_budget_gb}: must be > 0")
        if self.quant_block < 16 or self.quant_block % 16:
            raise ValueError(f"model.offload.quant_block={self.quant_block}: must be a multiple of 16")
        if self.hot_cache_gb is not None and self.hot_cache_gb < 0:
            raise ValueError(f"model.offload.hot_cache_gb={self.hot_cache_gb}: must be >= 0 (or null for auto)")
        if self.gpu_slots is not None and self.gpu_slots < 1:
            raise ValueError(f"model.offload.gpu_slots={self.gpu_slots}: must be >= 1 (or null)")
