"""Auxiliary-loss-free load balancing (DeepSeek-V3, section 2.1.2 of its report).

Each ``noaux_tc`` router carries ``e_score_correction_bias`` (E,), added to the scores only to choose experts.
After every optimizer step, each expert's bias moves by a fixed ``speed`` toward balance, judged by the load
of that step (all micro-batches, and all data-parallel ranks when a process group is up)::

    bias_e += speed * sign(mean_e(load) - load_e)

so an overloaded expert becomes less attractive and an idle one more. The update is outside autograd: no
gradient is read or written, and it never syncs the host (counts stay on the device). ``speed = 0`` freezes
the bias. The small sequence-wise balance loss that DeepSeek-V3 keeps next to it is the router's ``seq`` aux
loss on the normalised sigmoid scores (see :class:`~moetrain.models.router.TopKRouter`).

The training loop calls::

    balancer = BiasBalancer(model)              # speed from model.config.bias_update_speed
    ...
    out = model(batch); balancer.observe(out.routings)      # every micro-batch
    ...
    optimizer.step(); balancer.step()           # once per optimizer step
    metrics.update(balancer.stats())            # optional, syncs the host once
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from moetrain.models.router import Routing, TopKRouter


@torch.no_grad()
def update_correction_bias(bias: torch.Tensor, load: torch.Tensor, speed: float) -> None:
    """Move ``bias`` (E,) fp32 in place by ``speed`` toward balancing ``load`` (E,) tokens per expert."""
    load = load.to(torch.float32)
    bias.add_(torch.sign(load.mean() - load), alpha=speed)


def correction_biases(model: nn.Module) -> dict[int, torch.Tensor]:
    """{layer index: e_score_correction_bias} of every router that has one (empty for other routers)."""
    out: dict[int, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, TopKRouter) and module.e_score_correction_bias is not None:
            layer = int(name.split("layers.")[1].split(".")[0]) if "layers." in name else len(out)
            out[layer] = module.e_score_correction_bias
    return out


class BiasBalancer:
    """Accumulates each layer's expert load over an optimizer step and applies the bias update.

    Args:
        model: a model whose routers use ``topk_method: noaux_tc`` (others are left alone; then ``step`` is a
            no-op).
        speed: bias change per step; defaults to ``model.config.bias_update_speed``.
    """

    def __init__(self, model: nn.Module, speed: Optional[float] = None) -> None:
        config = getattr(model, "config", None)
        self.speed = float(speed if speed is not None else getattr(config, "bias_update_speed", 0.0))
        if self.speed < 0:
            raise ValueError(f"bias update speed must be >= 0, got {self.speed}")
        self.biases = correction_biases(model)
        self._load: dict[int, torch.Tensor] = {}
        self.last_load: dict[int, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return bool(self.biases) and self.speed > 0

    def observe(self, routings: Mapping[int, Routing | torch.Tensor]) -> None:
        """Add one micro-batch's per-layer expert counts: {layer: Routing} (``MoEOutput.routings``) or {layer: (E,)}."""
        for layer, routing in routings.items():
            if layer not in self.biases:
                continue
            counts = routing.counts if isinstance(routing, Routing) else routing
            counts = counts.detach()
            self._load[layer] = self._load[layer] + counts if layer in self._load else counts.clone()

    @torch.no_grad()
    def step(self, counts: Optional[Mapping[int, torch.Tensor]] = None) -> None:
        """Apply the update for the step that just ended, from the observed loads (plus ``counts`` if given),
        then start a new step. Every rank must call it (the loads are summed over the process group)."""
        if counts is not None:
            self.observe(counts)
        load, self._load = self._load, {}
        if dist.is_available() and dist.is_initialized() and load:
            stacked = torch.stack([load[k] for k in sorted(load)])  # (layers, E): one all-reduce per step
            dist.all_reduce(stacked)
            load = dict(zip(sorted(load), stacked, strict=True))
        self.last_load = load
        if self.speed == 0:
            return
        for layer, layer_load in load.items():
            update_correction_bias(self.biases[layer], layer_load.to(self.biases[layer].device), self.speed)

    def stats(self) -> dict[str, float]:
        """Numbers to log (reads the device once): the largest |bias| over layers, and the worst layer's
        max/mean expert load of the last step (1.0 is perfect balance)."""
        out: dict[str, float] = {}
        if self.biases:
            out["bias_abs_max"] = float(torch.stack([b.abs().max() for b in self.biases.values()]).max())
        if self.last_load:
            ratios = [load.float().max() / load.float().mean().clamp_min(1e-9) for load in self.last_load.values()]
            out["load_max_over_mean"] = float(torch.stack(ratios).max())
        return out
