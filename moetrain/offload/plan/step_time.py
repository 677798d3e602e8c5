"""The floor of an optimizer step: ``max(compute, bytes moved / link, bytes swapped / NVMe)``.

The active experts' state that is not in the hot cache goes up and comes back (``2 * state_bytes_per_param``
B/param, both directions at once; under ``master: bf16_sr | fp32_split`` with resident weights the host tier's
records leave their master (or its bf16 half) in the weights, :mod:`moetrain.offload.weight_masters`); with paged
compute weights every micro-batch also pages its active experts' weights in for forward and again for backward,
and the step writes the new weights of its active experts back.
A paged expert whose record lives in the NVMe swap is read from it before its step and written back after (hot
records stay on the GPU and are written back only when they cool); the swap holds the deepest layers' records
(the store fills host memory in layer order), and an expert there is taken to be active and cached as often as
any other. The three overlap (NVMe reads run ahead into staging buffers, transfers under compute), so the
slowest is the floor.
Compute is ``6 * active params * tokens`` FLOPs at an assumed sustained rate. The expected number of active
experts of a layer is ``E * (1 - (1 - 1/E) ** (tokens * k))`` (uniform routing; balanced routers are close to
it), and a cached expert is taken to be active as often as any other (the cache keeps the hottest, so fewer
bytes move than this says).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moetrain.config import ModelConfig


@dataclass(frozen=True)
class StepTraffic:
    """What one optimizer step moves over the host-GPU link.

    Attributes:
        active_experts: expected routed experts active in the step, all layers.
        paged_experts: the active ones whose state is paged (not in the hot cache).
        moved_bytes: bytes over the link per step (state up and back; paged weights too).
        nvme_bytes: bytes the NVMe swap reads and writes per step, together (each half of it).
    """

    active_experts: float
    paged_experts: float
    moved_bytes: float
    nvme_bytes: float = 0.0


def step_traffic(config: ModelConfig, *, tokens_per_step: int, micro_batch_tokens: int, per_expert: int,
                 state_bpp: float, hot_experts: int, offloaded: bool, paged_weights: bool,
                 weight_bytes: int, trained_fraction: float = 1.0, swap_per_record: float = 0.0) -> StepTraffic:
    """The expected traffic of one step of ``tokens_per_step`` tokens in micro-batches of ``micro_batch_tokens``.

    Args:
        per_expert: parameters of one routed expert; state_bpp: bytes per parameter of its state.
        hot_experts: experts whose state stays on the GPU; offloaded: the state lives off the GPU (tier not none).
        paged_weights: the compute weights (``weight_bytes`` per parameter) live in host memory as well.
        trained_fraction: the share of routed experts that train (``model.train.routed_experts``): only their state
            is paged, only their new weights are written back (frozen experts' weights are still paged in to
            compute with); ``hot_experts`` are among them.
        swap_per_record: the NVMe swap's bytes per trained expert, on average (the swap's size over the trained
            experts): a paged expert's record is there with the swap's share of the records, and moves whole.
    """
    e, k, n_moe = config.num_experts, config.num_experts_per_tok, len(config.moe_layers)
    total_experts = n_moe * e
    active_per_layer = e * (1.0 - (1.0 - 1.0 / e) ** (tokens_per_step * k))
    active = n_moe * active_per_layer
    trained_total = trained_fraction * total_experts
    paged = active * trained_fraction * (1.0 - hot_experts / trained_total) if offloaded and trained_total else 0.0
    moved = 2.0 * state_bpp * per_expert * paged
    nvme = 2.0 * paged * swap_per_record  # the paged records in the swap: read before their step, written after
    if paged_weights:
        # every micro-batch pages in its active experts' weights for forward and again for backward; the
        # step writes the new weights of the step's active experts back
        micro_batches = max(1, math.ceil(tokens_per_step / micro_batch_tokens))
        active_micro = n_moe * e * (1.0 - (1.0 - 1.0 / e) ** (micro_batch_tokens * k))
        moved += weight_bytes * per_expert * (2.0 * micro_batches * active_micro + active * trained_fraction)
    return StepTraffic(active_experts=active, paged_experts=paged, moved_bytes=moved, nvme_bytes=nvme)


def compute_seconds(config: ModelConfig, *, dense_params: int, per_expert: int, tokens_per_step: int,
                    compute_tflops: float, trained_fraction: float = 1.0, frozen_dense_params: int = 0,
                    recomputed: bool = False) -> float:
    """Seconds of ``6 * active params * tokens`` FLOPs (forward 2, backward 4: input and weight gradient, 2 each)
    at ``compute_tflops``. A frozen parameter's backward is its input gradient only (2): routed experts count
    ``4 + 2 * trained_fraction``, and ``frozen_dense_params`` (dense groups ``model.train`` freezes) drop their
    weight-gradient 2. (A frozen layer whose input needs no gradient either, before anything trains, skips its
    backward entirely; the estimate still counts its input gradient.) ``recomputed``: activation checkpointing runs
    every layer's forward again in backward, 2 more a parameter (the embedding and LM head are not recomputed,
    a few percent of the dense part; counted anyway)."""
    active_routed = len(config.moe_layers) * config.num_experts_per_tok * per_expert
    routed = active_routed * (4.0 + 2.0 * trained_fraction) / 6.0
    dense = dense_params - 2.0 * frozen_dense_params / 6.0
    again = 2.0 * (dense_params + active_routed) if recomputed else 0.0
    return (6.0 * (dense + routed) + again) * tokens_per_step / (compute_tflops * 1e12)
