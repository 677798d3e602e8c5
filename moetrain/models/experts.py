"""Routed experts: dispatch tokens grouped by expert, run each expert's SwiGLU MLP, combine.

Two compute paths, chosen per call:

* ``grouped``: one ``torch._grouped_mm`` per projection over all experts (CUDA, bf16). Token counts
  stay on the device: the path never reads a GPU value on the host, so transfers queued on side
  streams keep overlapping with it. Idle experts receive zero gradients (the stacked weight's
  gradient is dense); the sparse optimizer knows the active set from the routing counts.
* ``loop``: per-expert matmuls (CPU, or any dtype/shape the grouped kernel rejects). Experts that
  got no tokens do not run, so their ``.grad`` stays ``None`` exactly as in plain PyTorch.

Shapes: ``T`` tokens, ``H`` hidden, ``I`` expert width, ``E`` experts, ``k`` top-k, ``N = T * k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moetrain.models.router import Routing


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); used for dense MLPs, shared experts and routed experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Dispatch:
    """Tokens sorted by expert.

    Attributes:
        token_of: (N,) index of the source token of each sorted row.
        weight: (N,) combine weight of each sorted row.
        counts: (E,) rows per expert (device).
        offsets: (E,) int32 cumulative end offsets, as ``torch._grouped_mm`` takes them.
    """

    token_of: torch.Tensor
    weight: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor


def dispatch(routing: Routing) -> Dispatch:
    """Group the (token, slot) assignments of ``routing`` by expert without a host sync."""
    k = routing.topk_idx.shape[1]
    flat = routing.topk_idx.reshape(-1)  # (N,)
    order = torch.argsort(flat, stable=True)  # rows of expert 0 first, then 1, ...
    return Dispatch(
        token_of=order // k,
        weight=routing.topk_weight.reshape(-1)[order],
        counts=routing.counts,
        offsets=torch.cumsum(routing.counts, 0).to(torch.int32),
    )


def grouped_mm_supported(x: torch.Tensor, hidden: int, width: int) -> bool:
    """Whether ``torch._grouped_mm`` can run this shape here (CUDA, bf16, 16-byte aligned dims)."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and hidden % 8 == 0
        and width % 8 == 0
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


class RoutedExperts(nn.ModuleList):
    """E independent SwiGLU experts: ``self[e].{gate,up,down}_proj.weight`` are separate parameters
    (Hugging Face names ``mlp.experts.{e}.*``), so each expert can be a separate record in the
    offload store and an idle expert's ``.grad`` can stay ``None``.

    ``impl`` is ``auto`` (grouped where supported, else loop), ``grouped`` or ``loop``.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, impl: str = "auto") -> None:
        super().__init__(SwiGLU(hidden_size, intermediate_size) for _ in range(num_experts))
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.impl = impl

    def use_grouped(self, x: torch.Tensor) -> bool:
        if self.impl == "loop":
            return False
        ok = grouped_mm_supported(x, self.hidden_size, self.intermediate_size)
        if self.impl == "grouped" and not ok:
            raise RuntimeError("expert impl 'grouped' needs torch._grouped_mm on a CUDA device of compute "
                               "capability >= 9.0 with bf16 activations; use impl 'auto' or 'loop'")
        return ok

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x: (T, H); returns (T, H) = sum over chosen experts of weight * expert(x)."""
        d = dispatch(routing)
        x_sorted = x[d.token_of]  # (N, H)
        if self.use_grouped(x):
            y = self._grouped(x_sorted, d.offsets)
        else:
            y = self._loop(x_sorted, d.counts)
        y = y * d.weight[:, None].to(y.dtype)  # (N, H)
        out = torch.zeros_like(x)
        out.index_add_(0, d.token_of, y.to(x.dtype))
        return out

    def _grouped(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # (E, H, I) views of the stacked weights; grouped_mm takes the transposed layout as is.
        w_gate = torch.stack([e.gate_proj.weight for e in self]).transpose(1, 2)
        w_up = torch.stack([e.up_proj.weight for e in self]).transpose(1, 2)
        w_down = torch.stack([e.down_proj.weight for e in self]).transpose(1, 2)  # (E, I, H)
        dt = x_sorted.dtype
        g = torch._grouped_mm(x_sorted, w_gate.to(dt), offs=offsets)  # (N, I)
        u = torch._grouped_mm(x_sorted, w_up.to(dt), offs=offsets)
        return torch._grouped_mm(F.silu(g) * u, w_down.to(dt), offs=offsets)  # (N, H)

    def _loop(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # One host read of the counts; fine on the CPU, and the fallback on GPUs without grouped GEMM.
        sizes = counts.tolist()
        pieces = []
        start = 0
        for e, n in enumerate(sizes):
            if n:
                pieces.append(self[e](x_sorted[start:start + n]))
            start += n
        if not pieces:
            return x_sorted.new_zeros(x_sorted.shape)
        return torch.cat(pieces, 0)
