"""The optimizer of a multi-rank run: dense gradients summed everywhere, expert state partitioned.

One optimizer step on every rank (collectives in this order on every rank, whatever the routing)::

    counts      all-reduce (M, E) routed-token counts          world        -> which experts were active
    dense       all-reduce of every dense gradient (one flat)  world        (replicated parameters)
    experts     per MoE layer, a flat (E_local, n) gradient buffer:
                reduce chunk i to holder i                     holder group (partitioned state)
                or all-reduce it                               holder group (replicated state)
    norm        all-reduce of the experts' squared norms       world        (each expert counted once)
    step        dense AdamW here; the inner optimizer steps the experts whose state this rank owns
    weights     per MoE layer, broadcast chunk i of the packed compute weights from holder i

Gradients of an expert that got no token anywhere stay None, as in a single process (``idle_experts:
skip`` semantics). The training loop scales each rank's loss so that the sum over ranks is the loss of
the global batch (:func:`moetrain.parallel.loss.loss_for_backward`); the reductions are therefore sums.

The inner optimizer is the single-process one: :class:`~moetrain.offload.composite.CompositeOptimizer`
built with ``owns=`` (its store keeps only this rank's records), or, under ``tier: none``,
:class:`~moetrain.optim.DenseAdamW` over the parameters this rank holds (state replicated on
the holders: it is the reference, not the memory-saving path). Stepping layers under backward
(``begin_micro_batch``) is not offered: gradients are final only after the reductions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from moetrain.config import ConfigError
from moetrain.offload.config import OffloadPlan
from moetrain.optim import CheckpointState, DenseAdamW, OptimizerConfig, SavedOptimizerState, TrainOptimizer
from moetrain.parallel.layout import ParallelLayout

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _expert_params(expert: nn.Module) -> list[nn.Parameter]:
    return [getattr(expert, name).weight for name in PROJECTIONS]


class ParallelOptimizer(TrainOptimizer):
    """:class:`~moetrain.optim.TrainOptimizer` over the ranks of ``layout``.

    Args:
        model: this rank's model (already split by :func:`~moetrain.parallel.expert_parallel.apply_expert_parallel`
            when ``layout.ep > 1``), on its compute device.
        cfg: AdamW settings; ``offload``: the ``model.offload`` section (tier none, cpu or nvme).
    """

    def __init__(self, model: nn.Module, cfg: OptimizerConfig, offload: OffloadPlan, layout: ParallelLayout) -> None:
        if offload.idle_experts == "dense":
            raise ConfigError("model.offload.schedule.idle_experts=dense is not supported with several ranks yet; "
                              "use skip")
        self.model, self.cfg, self.layout = model, cfg, layout
        self.blocks = model.moe_blocks()
        expert_names = model.expert_parameter_names()
        self.dense_params = [p for n, p in model.named_parameters() if n not in expert_names and p.requires_grad]
        self.device = self.dense_params[0].device
        self.sync_parameters()  # before the inner optimizer copies master weights out of the model
        self.partitioned = offload.tier != "none" and layout.partition
        self.inner: TrainOptimizer
        if offload.tier == "none":
            self.inner = DenseAdamW(model, cfg)
        else:
            from moetrain.offload.build import build_offload_optimizer

            self.inner = build_offload_optimizer(model, cfg, offload, owns=layout.owns if layout.partition else None)
        num_layers, num_experts = len(self.blocks), layout.num_experts
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=self.device)  # (M, E)
        self._layer_pos = {b.layer_idx: m for m, b in enumerate(self.blocks)}
        model.attach_offload(routing=self)  # stands in front of the inner optimizer: counts, then hands on
        self._synced = False

    # ------------------------------------------------------------------ set-up
    def _local_experts(self, block: nn.Module) -> list[nn.Module]:
        return [block.experts[e] for e in self.layout.local_experts]

    @torch.no_grad()
    def sync_parameters(self) -> None:
        """Make every replica equal: dense parameters from world rank 0, experts from the first holder."""
        if self.layout.world == 1:
            return
        for p in self.dense_params:
            dist.broadcast(p.data, src=0)
        if self.layout.holders > 1:
            for block in self.blocks:
                for expert in self._local_experts(block):
                    for p in _expert_params(expert):
                        dist.broadcast(p.data, src=self.layout.holder_ranks[0], group=self.layout.holder_group)

    def routed(self, layer: int, routing: Any, hidden: torch.Tensor) -> None:
        """The model's routing sink: this rank's counts for the all-reduce, then the inner optimizer's own sink
        (which counts them too, and prefetches from them)."""
        if torch.is_grad_enabled():
            self.counts[self._layer_pos[layer]] += routing.counts
        self.inner.routed(layer, routing, hidden)

    # ------------------------------------------------------------------ gradient reductions
    @torch.no_grad()
    def synchronize_gradients(self) -> torch.Tensor:
        """Run the reductions of the step (once); returns the (M, E) global counts on the host."""
        local = self.counts.clone()  # what the inner optimizer has counted itself
        dist.all_reduce(self.counts)
        counts = self.counts.cpu()  # the step's one host read of routing
        others = self.counts - local  # the other ranks' tokens: the inner optimizer then holds the global counts
        for block in self.blocks:  # the offload engine steps the experts these counts call active
            self.inner.add_routed_counts(block.layer_idx, others[self._layer_pos[block.layer_idx]])
        if self.dense_params:
            # every rank sends every dense gradient (zeros where it has none: a rank whose micro-batches put no
            # trained parameter in the graph skipped backward) and one presence flag each, in one collective, so
            # the ranks' buffers always match; a parameter no rank has a gradient for stays None, as in one process
            flat = torch.cat([p.grad.reshape(-1).to(self.dense_params[0].dtype) if p.grad is not None
                              else torch.zeros(p.numel(), dtype=self.dense_params[0].dtype, device=p.device)
                              for p in self.dense_params]
                             + [torch.tensor([float(p.grad is not None) for p in self.dense_params],
                                             dtype=self.dense_params[0].dtype, device=self.dense_params[0].device)])
            dist.all_reduce(flat)
            sizes = [p.numel() for p in self.dense_params]
            *reduced, present = torch.split(flat, [*sizes, len(sizes)])
            for p, g, here in zip(self.dense_params, reduced, present.tolist(), strict=True):
                if here == 0:
                    continue
                if p.grad is None:
                    p.grad = g.view(p.shape).to(p.dtype).clone()
                else:
                    p.grad.copy_(g.view(p.shape))
        for m, block in enumerate(self.blocks):
            self._reduce_layer(block, counts[m])
        self._synced = True
        return counts

    def _reduce_layer(self, block: nn.Module, counts: torch.Tensor) -> None:
        lay = self.layout
        experts = self._local_experts(block)
        params = [_expert_params(e) for e in experts]
        sizes = [p.numel() for p in params[0]]
        first = params[0][0]
        buf = torch.zeros(len(experts), sum(sizes), dtype=first.dtype, device=first.device)  # (E_local, n)
        for row, ps in zip(buf, params, strict=True):
            for piece, p in zip(torch.split(row, sizes), ps, strict=True):
                if p.grad is not None:
                    piece.copy_(p.grad.reshape(-1))
        start = lay.local_experts.start
        if lay.holders > 1:
            if self.partitioned:
                for i, chunk in enumerate(lay.owner_chunks()):
                    dist.reduce(buf[chunk.start - start:chunk.stop - start], dst=lay.holder_ranks[i],
                                group=lay.holder_group)
            else:
                dist.all_reduce(buf, group=lay.holder_group)
        held = lay.owned_experts if self.partitioned else lay.local_experts
        for e, row, ps in zip(lay.local_experts, buf, params, strict=True):
            keep = e in held and counts[e] > 0  # no token anywhere: None, as a single process leaves it
            for piece, p in zip(torch.split(row, sizes), ps, strict=True):
                p.grad = piece.view(p.shape) if keep else None

    # ------------------------------------------------------------------ TrainOptimizer
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Reduce the gradients, then the global norm over all parameters (every expert counted once);
        scales the gradients this rank will step when the norm exceeds ``max_norm > 0``."""
        if not self._synced:
            self.synchronize_gradients()
        lay = self.layout
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        dense = [p.grad for p in self.dense_params if p.grad is not None]
        dense_sq = sum((g.float().square().sum() for g in dense), zero)
        expert_grads = self._expert_grads()
        counted = [p.grad for block in self.blocks for e in lay.local_experts if lay.counts_norm(e)
                   for p in _expert_params(block.experts[e]) if p.grad is not None]
        expert_sq = sum((g.float().square().sum() for g in counted), zero)
        dist.all_reduce(expert_sq)
        norm = torch.sqrt(dense_sq + expert_sq)
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in dense + expert_grads:
                g.mul_(coef.to(g.device, g.dtype))
        return norm

    def _expert_grads(self) -> list[torch.Tensor]:
        return [p.grad for block in self.blocks for expert in self._local_experts(block)
                for p in _expert_params(expert) if p.grad is not None]

    @torch.no_grad()
    def step(self, lr: float) -> None:
        if not self._synced:
            self.synchronize_gradients()
        self.inner.step(lr)
        if self.partitioned and self.layout.holders > 1:
            self._broadcast_weights()
        self.counts.zero_()
        self._synced = False

    def _broadcast_weights(self) -> None:
        """Chunk i of every layer's packed compute weights from holder i to the others (in place)."""
        lay = self.layout
        start = lay.local_experts.start
        for block in self.blocks:
            for packed in block.experts.packed_weights():  # (E_local, ...) views of the parameters
                for i, chunk in enumerate(lay.owner_chunks()):
                    dist.broadcast(packed[chunk.start - start:chunk.stop - start], src=lay.holder_ranks[i],
                                   group=lay.holder_group)

    def zero_grad(self) -> None:
        self.inner.zero_grad()
        for block in self.blocks:
            for expert in self._local_experts(block):
                for p in _expert_params(expert):
                    p.grad = None

    def telemetry(self) -> dict[str, float]:
        return self.inner.telemetry()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def checkpoint_state(self, *, background: bool = False) -> CheckpointState:
        """This rank's optimizer state (the inner optimizer's); each rank writes its share of it."""
        return self.inner.checkpoint_state(background=background)

    def load_checkpoint_state(self, saved: SavedOptimizerState) -> None:
        """The state of the parameters this rank steps (a filtered read of a checkpoint of any world size)."""
        self.inner.load_checkpoint_state(saved)

    def finalize(self) -> None:
        self.inner.finalize()

    def close(self) -> None:
        self.inner.close()
