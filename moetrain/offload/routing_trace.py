"""The routing trace: which experts each layer routed to in this optimizer step, learned without a host sync.

Each layer's routing counts are copied to pinned host memory with ``non_blocking=True`` and an event;
backward-time prefetch polls the event (``query``: never blocks) and pages in the state of the experts that
layer has used so far. State does not change until its step, so any page-in after the routing is known is
valid. Stepping a layer under backward reads the layer's summed counts from these host copies
(:meth:`RoutingTrace.host_counts`), waiting only for the small copies, never behind the page-outs.
"""

from __future__ import annotations

from typing import Optional

import torch

from moetrain.offload.streams import recorded


class RoutingTrace:
    """Per-layer union of the experts routed so far in this optimizer step, learned without a host sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.inflight: dict[int, list[tuple[torch.Tensor, Optional[torch.cuda.Event]]]] = {}
        self.known: dict[int, torch.Tensor] = {}
        self.history: dict[int, list[tuple[torch.Tensor, Optional[torch.cuda.Event]]]] = {}

    def record(self, layer: int, counts: torch.Tensor) -> None:
        """Queue the copy of ``layer``'s (E,) device counts of one micro-batch to the host (no sync)."""
        if self.device.type == "cuda":
            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host.copy_(counts, non_blocking=True)
        else:
            host = counts.clone()
        event = recorded(self.device)
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
