"""The one seam between the model and an offload engine: what the model calls, never what it imports.

The model knows three small protocols and nothing of the engine behind them; the first two are attached once,
by :meth:`~moetrain.models.decoder.MoEForCausalLM.attach_offload`:

* :class:`ExpertWeights`: where the routed experts' compute weights live when they are not the model's
  parameters (``resident_weights: no``: host memory, paged onto the device per active expert). The
  experts hand it the sorted rows; it fetches, runs, releases and prefetches the neighbour layer.
* :class:`RoutingSink`: told every routing decision (the counts a layer produced, and the layer's input
  for look-ahead), before the experts run; evaluation forwards too (``torch.is_grad_enabled()`` tells them
  apart: an engine that catches idle experts up must do so before they compute). The recomputation that activation
  checkpointing makes in backward is not reported again.

A third, :class:`BackwardSink`, is attached per MoE block (:meth:`~moetrain.models.moe.MoEBlock.notify_backward`):
told when backward has finished the layer, for layers whose router does not train (a trained router's weight
gradient is that signal without the model's help).

"recomputing" (this forward is that re-run) is an argument passed down the layers, not ambient state.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn

from moetrain.models.router import Routing


class ExpertWeights(Protocol):
    """Paged compute weights of every MoE layer's routed experts (the values behind placeholder parameters)."""

    def fetch(self, layer: int, experts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(E, I, H) gate, (E, I, H) up, (E, H, I) down weights of ``layer`` with ``experts``' rows current."""

    def release(self, layer: int) -> None:
        """The kernels reading ``layer``'s fetched weights are queued."""

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start moving ``layer``'s rows of ``experts`` towards the device (no wait)."""

    def run(self, layer: int, x_sorted: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor,
            params: list[nn.Parameter], *, grouped: bool, recomputing: bool) -> torch.Tensor:
        """Every routed expert of ``layer`` over its rows: ``x_sorted`` (N, H) sorted by expert, ``counts`` (E,)
        rows per expert, ``offsets`` (E,) int32 end offsets; ``params`` receive the gradients. Returns (N, H)."""


class RoutingSink(Protocol):
    """Receives each MoE layer's routing (before the layer's experts run)."""

    def routed(self, layer: int, routing: Routing, hidden: torch.Tensor) -> None:
        """``routing.counts`` (E,) are the tokens ``layer`` sent to each expert; ``hidden`` (T, H) its input."""


class BackwardSink(Protocol):
    """Told when backward has finished an MoE layer: the gradient of the layer's input is computed, so every
    gradient of the layer (router, routed and shared experts) is final for this backward."""

    def backward_done(self, layer: int) -> None:
        """Backward has finished ``layer`` (once per backward that reaches it: every micro-batch's)."""
