"""Routed experts that do not train (``model.train``, :mod:`moetrain.models.train_selection`): the engine keeps no
state for them. They have no record in the expert store, nothing in a tier, nothing paged or stepped; the store
only remembers where their weights are (the model's parameters, or the pager's rows under
``resident_weights: no``), so that checkpoints, exports and loads still see the whole model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn


def trains(params: list[nn.Parameter], prefix: str) -> bool:
    """Whether an expert trains: all of its parameters require a gradient (True) or none does (False).

    Raises:
        ValueError: some do and some do not (an expert trains or is frozen as a whole).
    """
    flags = {p.requires_grad for p in params}
    if len(flags) > 1:
        raise ValueError(f"{prefix}: some of the expert's parameters require a gradient and some do not; train or "
                         "freeze an expert as a whole (model.train.routed_experts)")
    return flags.pop()


@dataclass
class FrozenExpert:
    """A routed expert that does not train.

    Attributes:
        layer, expert, prefix, params, names, shapes: as :class:`~moetrain.offload.store.ExpertRecord`'s.
    """

    layer: int
    expert: int
    prefix: str
    params: list[nn.Parameter]
    names: list[str]
    shapes: list[torch.Size]

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.expert)

    def offsets(self) -> list[int]:
        """Element offset of each parameter in the expert's flat ``gate | up | down`` row (the pager's)."""
        out, start = [], 0
        for shape in self.shapes:
            out.append(start)
            start += shape.numel()
        return out

    @torch.no_grad()
    def write(self, idx: int, weight: torch.Tensor, pager: Optional[object] = None) -> None:
        """Parameter ``idx`` takes ``weight`` (any dtype): into the pager's row when the compute weights are paged
        (the parameters are placeholders then), else into the parameter (cast)."""
        if pager is not None:
            pager.write(self.layer, self.expert, weight.reshape(-1), start=self.offsets()[idx])
        else:
            self.params[idx].data.copy_(weight.reshape(self.shapes[idx]))

    @torch.no_grad()
    def weights(self, pager: Optional[object] = None) -> list[torch.Tensor]:
        """The expert's weights as fp32 host copies shaped like its parameters (from the pager's rows when paged)."""
        if pager is not None:
            row = pager.weights(self.layer, self.expert)
            return [row[o:o + s.numel()].float().view(s).clone() for o, s in zip(self.offsets(), self.shapes,
                                                                                   strict=True)]
        return [p.detach().float().cpu().clone() for p in self.params]
