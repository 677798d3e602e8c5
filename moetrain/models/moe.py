"""The MoE block: router, routed experts, and the family's shared expert(s)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from moetrain.config import DEEPSEEK_FAMILIES, ModelConfig
from moetrain.models.experts import RoutedExperts, SwiGLU
from moetrain.models.router import Routing, TopKRouter
from moetrain.models.seam import BackwardSink, RoutingSink


class MoEBlock(nn.Module):
    """Routes each token to k of E experts and adds the shared expert(s).

    * deepseek_moe, deepseek_v2, deepseek_v3: ``shared_experts`` is one SwiGLU of width
      moe_intermediate_size * n_shared.
    * qwen2_moe: ``shared_expert`` scaled by sigmoid(``shared_expert_gate``(x)).

    ``sink``, when attached (:meth:`~moetrain.models.decoder.MoEForCausalLM.attach_offload`), is told every
    routing decision of this layer (evaluation forwards too; not the re-run in backward) before the experts
    run, so that an offload engine can page the experts' state in. ``backward_sinks``
    (:meth:`notify_backward`) are told when backward has finished the layer.
    """

    def __init__(self, config: ModelConfig, layer_idx: int, aux_scale: float = 1.0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = TopKRouter(config, aux_scale=aux_scale)
        self.experts = RoutedExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size,
                                     layer_idx=layer_idx)
        self.shared_experts: Optional[nn.Module] = None
        self.shared_expert: Optional[nn.Module] = None
        self.shared_expert_gate: Optional[nn.Linear] = None
        if config.family in DEEPSEEK_FAMILIES and config.num_shared_experts > 0:
            self.shared_experts = SwiGLU(config.hidden_size, config.shared_width)
        elif config.shared_expert_intermediate_size > 0:
            self.shared_expert = SwiGLU(config.hidden_size, config.shared_expert_intermediate_size)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.sink: Optional[RoutingSink] = None
        # handle id -> sink; an OrderedDict as nn.Module's hook dicts are (the handle keeps a weak reference)
        self.backward_sinks: OrderedDict[int, BackwardSink] = OrderedDict()

    def notify_backward(self, sink: BackwardSink) -> RemovableHandle:
        """Tell ``sink.backward_done(layer_idx)`` each time backward has computed the gradient of this block's
        input, until the returned handle is removed.

        That gradient needs every consumer of the input to have run its backward (the routed experts, whose
        weight gradients are computed with their input gradient, the router and the shared experts), so it
        comes after all of them, however the experts store their gradients. A forward whose input needs no
        gradient (inference, or every parameter before this layer frozen) gives no signal: nothing of the
        layer's backward can be known to have finished before backward itself does.
        """
        handle = RemovableHandle(self.backward_sinks)
        self.backward_sinks[handle.id] = sink
        return handle

    def _watch_input(self, flat: torch.Tensor) -> None:
        """Hook ``flat`` (T, H), the block's input, for the backward sinks; once per forward, not the re-run of
        activation checkpointing (its non-reentrant backward runs through this first pass's graph, hook included)."""
        sinks = list(self.backward_sinks.values())
        layer = self.layer_idx

        def done(_grad: torch.Tensor) -> None:
            for sink in sinks:
                sink.backward_done(layer)

        flat.register_hook(done)

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None, *,
                recomputing: bool = False) -> tuple[torch.Tensor, Routing]:
        """x: (B, L, H); valid: (B, L) bool or None; ``recomputing``: this forward is activation checkpointing's
        re-run in backward (its routing was reported by the first pass). Returns ((B, L, H), routing)."""
        b, seq, h = x.shape
        flat = x.reshape(b * seq, h)  # (T, H)
        if self.backward_sinks and flat.requires_grad and not recomputing:
            self._watch_input(flat)
        routing = self.gate(flat, batch_size=b, valid=None if valid is None else valid.reshape(-1))
        if self.sink is not None and not recomputing:
            self.sink.routed(self.layer_idx, routing, flat)
        out = self.experts(flat, routing, recomputing=recomputing)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        return out.reshape(b, seq, h), routing
