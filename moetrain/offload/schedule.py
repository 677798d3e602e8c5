"""When the expert engine steps a layer, and how much device memory its state gets: each rule once.

The engine (``offload/optim.py``), the planner (``offload/plan/``) and the pre-flight checks (``preflight.py``) all
ask these functions instead of restating the rules, so changing the schedule (for example stepping layers under
backward in more cases) is an edit of this file only. They are pure: configs and counts in, an answer out.

One optimizer step, with ``accumulate_grad_batches`` micro-batches::

    micro-batch 0 .. n-2   forward, backward               (expert gradients accumulate)
    micro-batch n-1        forward, backward of layer L     -> step layer L's experts   } only when
                                    backward of layer L-1   -> step layer L-1's experts } steps_under_backward
                                    ...
    step()                 step the dense part, and every layer not stepped above

A layer can be stepped as soon as backward has finished it only when its gradients are final (the last
micro-batch) and nothing later rescales them (no global-norm clipping: the norm needs every gradient first).

Device memory of the expert state::

    gpu_budget_gb   -> num_state_slots   records being stepped (half compute while the other half fills)
    hot_cache_gb    -> hot_capacity      records kept on the device between steps (never more than the rest)
"""

from __future__ import annotations

from moetrain.config import ConfigError
from moetrain.offload.config import OffloadPlan
from moetrain.optim import OptimizerConfig

GiB = 2**30


def steps_under_backward(optimizer: OptimizerConfig, *, micro_batch: int, micro_batches: int) -> bool:
    """Whether the backward of micro-batch ``micro_batch`` (0-based) of ``micro_batches`` steps each MoE layer's
    experts as soon as it has finished the layer: the last micro-batch (its gradients are final), and no
    global-norm clipping (``max_grad_norm == 0``; clipping needs the norm of every gradient before any step)."""
    return micro_batch == micro_batches - 1 and optimizer.max_grad_norm == 0


def layerwise_grads(optimizer: OptimizerConfig, offload: OffloadPlan, *, accumulate_grad_batches: int) -> bool:
    """Whether only one MoE layer's expert gradients are alive at a time: every backward steps under backward
    (:func:`steps_under_backward` of a single micro-batch, ``accumulate_grad_batches == 1``), and every expert is
    stepped on the GPU (``step_on: gpu``), which frees a layer's gradients right after its step; the CPU share's
    gradients are still being copied down by the CPU thread and stay until ``zero_grad``."""
    every_backward = accumulate_grad_batches == 1 and steps_under_backward(optimizer, micro_batch=0, micro_batches=1)
    return every_backward and offload.step_on == "gpu"


def num_state_slots(offload: OffloadPlan, *, record_bytes: int, num_records: int) -> int:
    """Device slots for expert state being stepped: as many records of ``record_bytes`` (the largest record, as the
    store lays it out: aligned) as ``gpu_budget_gb`` holds, at most ``gpu_slots`` and at most ``num_records``.

    Raises:
        ConfigError: the budget holds no record (the message names the key and the fix).
    """
    slots = int(offload.gpu_budget_gb * GiB) // record_bytes
    if slots < 1:
        raise ConfigError(f"model.offload.placement.gpu_budget_gb={offload.gpu_budget_gb} holds no expert: one "
                          f"expert's state takes {record_bytes / 2**20:.1f} MiB; raise the budget")
    if offload.gpu_slots is not None:
        slots = min(slots, offload.gpu_slots)
    return min(slots, num_records)


def hot_capacity(*, nbytes: float, record_bytes: int, num_records: int, num_slots: int) -> int:
    """Records whose state ``nbytes`` of device memory hold between steps, at most every record that has no slot
    (a record in a slot is on the device already)."""
    return max(0, min(int(nbytes // record_bytes), num_records - num_slots))
