"""Routing foresight: the next layer's router applied to the current layer's input, and the routing trace.

* Look-ahead: a forward pre-hook on MoE block i scores its input with block i+1's router (one small
  (T, H) x (H, E) matmul) and keeps the predicted top-k set as an (E,) mask on the device. When block
  i+1 routes, predicted and actual sets are compared on the device (no host sync); the host reads the
  totals once per optimizer step as precision (predicted experts that were used) and recall (used
  experts that were predicted).
* Trace: each layer's routing counts are copied to pinned host memory with ``non_blocking=True`` and an
  event; backward-time prefetch polls the event (``query``: never blocks) and pages in the state of the
  experts that layer has used so far. State does not change until its step, so any page-in after the
  routing is known is valid.

With compute weights resident, what must move before a step is the state of the experts that were
actually used, which the trace gives exactly; so prefetch is driven by the trace, and the look-ahead
is measured (its precision and recall are what paging compute weights per expert would rely on).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from moetrain.models.recompute import is_recomputing


class Lookahead:
    """Predicted-vs-actual accounting for the next MoE layer's experts (device counters)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        blocks = model.moe_blocks()
        self.next_block = {blocks[i].layer_idx: blocks[i + 1] for i in range(len(blocks) - 1)}
        self.pending: dict[int, torch.Tensor] = {}
        self.totals = torch.zeros(3, dtype=torch.int64, device=device)  # [hits, predicted, actual]
        self.handles = [b.register_forward_pre_hook(self._predict) for b in blocks]

    def _predict(self, block: nn.Module, args: tuple) -> None:
        nxt = self.next_block.get(block.layer_idx)
        if nxt is None or not torch.is_grad_enabled() or is_recomputing():  # first training forwards only
            return
        with torch.no_grad():
            self.pending[nxt.layer_idx] = self._predicted_mask(nxt, args[0])

    @staticmethod
    def _predicted_mask(nxt: nn.Module, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()  # (T, H)
        logits = flat @ nxt.gate.weight.float().t()  # (T, E)
        idx = logits.topk(nxt.gate.top_k, dim=-1).indices.reshape(-1)
        mask = torch.zeros(nxt.gate.num_experts, dtype=torch.bool, device=x.device)
        return mask.index_fill_(0, idx, True)

    @torch.no_grad()
    def observe(self, layer: int, counts: torch.Tensor) -> None:
        pred = self.pending.pop(layer, None)
        if pred is None:
            return
        actual = counts > 0
        self.totals += torch.stack([(pred & actual).sum(), pred.sum(), actual.sum()])

    def read(self) -> tuple[float, float]:
        """(precision, recall) since the last read (host read: once per optimizer step)."""
        hits, predicted, actual = self.totals.tolist()
        self.totals.zero_()
        return (hits / predicted if predicted else 0.0, hits / actual if actual else 0.0)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class RoutingTrace:
    """Per-layer union of the experts routed so far in this optimizer step, learned without a host sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.inflight: dict[int, list[tuple[torch.Tensor, Optional[torch.cuda.Event]]]] = {}
        self.known: dict[int, torch.Tensor] = {}
        self.history: dict[int, list[tuple[torch.Tensor, Optional[torch.cuda.Event]]]] = {}

    def record(self, layer: int, counts: torch.Tensor) -> None:
        if self.device.type == "cuda":
            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = counts.clone(), None
        self.inflight.setdefault(layer, []).append((host, event))
        self.history.setdefault(layer, []).append((host, event))

    def host_counts(self, layer: int) -> Optional[torch.Tensor]:
        """(E,) tokens per expert of ``layer`` summed over the micro-batches recorded so far, on the host.

        Waits only for the small copies queued in forward (each behind its own event), not for the
        device's other streams: unlike ``counts.cpu()``, it does not queue behind page-outs.
        """
        recorded = self.history.get(layer)
        if not recorded:
            return None
        total = None
        for host, event in recorded:
            if event is not None:
                event.synchronize()
            total = host.clone() if total is None else total + host
        return total

    def poll(self, layer: int) -> Optional[torch.Tensor]:
        """(E,) bool of experts known to be routed in ``layer`` so far (None if nothing arrived yet)."""
        waiting = []
        for host, event in self.inflight.get(layer, []):
            if event is None or event.query():
                seen = host > 0
                self.known[layer] = seen if layer not in self.known else self.known[layer] | seen
            else:
                waiting.append((host, event))
        self.inflight[layer] = waiting
        return self.known.get(layer)

    def reset(self) -> None:
        self.inflight.clear()
        self.known.clear()
        self.history.clear()
