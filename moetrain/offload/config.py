"""Where the routed experts' optimizer state lives: the ``model.offload`` section of a recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class OffloadConfig:
    """Placement of expert state.

    Attributes:
        tier: ``none`` keeps every expert's state on the compute device (the reference); ``cpu`` keeps
            master weights and Adam moments in pinned host memory; ``nvme`` keeps them in swap files.
        nvme_path: folder for swap files (tier ``nvme``, or overflow past ``cpu_budget_gb``).
        gpu_budget_gb: bytes of expert state the store may hold on the compute device (cache slots).
        cpu_budget_gb: host memory for expert state; what exceeds it overflows to NVMe (None: no limit).
        resident_weights: keep experts' compute weights on the device (``auto``: when they fit).
        step_on: where offloaded experts are stepped: ``gpu``, ``cpu`` (DeepSpeedCPUAdam) or ``auto``.
        idle_experts: ``skip`` (as torch AdamW with grad None) or ``dense`` (exact lazy catch-up of the
            zero-gradient steps a dense AdamW would have applied).
        prefetch: page state in ahead of need (look-ahead and backward trace).
    """

    tier: str = "none"
    nvme_path: Optional[str] = None
    gpu_budget_gb: float = 4.0
    cpu_budget_gb: Optional[float] = None
    resident_weights: str = "auto"
    step_on: str = "gpu"
    idle_experts: str = "skip"
    prefetch: bool = True

    def __post_init__(self) -> None:
        choices = {"tier": ("none", "cpu", "nvme"), "resident_weights": ("auto", "yes", "no"),
                   "step_on": ("gpu", "cpu", "auto"), "idle_experts": ("skip", "dense")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.offload.{key}={getattr(self, key)!r}: choose one of {', '.join(allowed)}")
        if self.tier == "nvme" and not self.nvme_path:
            raise ValueError("model.offload.tier=nvme needs model.offload.nvme_path=DIR (a folder on a fast disk)")
