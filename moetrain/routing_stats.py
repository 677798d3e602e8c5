"""Routing statistics of an MoE model over a sample of data, and the expert selection ESFT makes from them.

Expert-specialized fine-tuning (ESFT, Wang et al. 2024, arXiv 2407.01906) trains only the experts that a
task's tokens use. It measures, per MoE layer and expert ``e`` over the task's ``N`` tokens:

* the **gate score** (ESFT-Gate): ``sum over tokens t of g[t, e] / N``, where ``g[t, e]`` is the weight with
  which expert ``e`` enters token ``t``'s output (the router's combine weight, after any top-k renormalisation
  and ``routed_scaling_factor``) and 0 when ``e`` is not in the token's top-k;
* the **token ratio** (ESFT-Token): the fraction of tokens whose top-k holds ``e`` (over ``E`` experts it
  sums to ``k``);

and keeps, per layer, the fewest experts, best first, whose share of the layer's total score reaches
``top_p`` (:func:`select_by_coverage`).

:func:`collect_routing_stats` runs the model without gradients and reads each MoE layer's
:class:`~moetrain.models.router.Routing` from a forward hook on its router: no engine hook is taken, and the
forward stops after the last MoE layer's router (the remaining experts, layers and the LM head would only
cost time). The model must fit where it is; streaming a larger model through one layer at a time is not
implemented here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from moetrain.models.moe import MoEBlock
from moetrain.models.router import Routing
from moetrain.progress import shown

Batch = Union[torch.Tensor, Mapping[str, torch.Tensor]]
"""(B, L) ``input_ids``, or the model's keyword arguments (``input_ids``, ``position_ids``, ``document_ids``,
``attention_mask``: a packed row's documents then attend only to themselves, as in training)."""

FORMAT = "moetrain-routing-stats"


@dataclass
class RoutingStats:
    """Per MoE layer, each expert's mean gate score and token ratio over ``tokens`` tokens.

    Attributes:
        layers: MoE layer indices, in order.
        gate_score: layer -> (E,) float64, mean over tokens of the expert's gate weight (0 when not in the
            token's top-k).
        token_ratio: layer -> (E,) float64, fraction of tokens whose top-k holds the expert (sums to k over E).
        tokens: the tokens the means are over.
    """

    layers: list[int]
    gate_score: dict[int, torch.Tensor]
    token_ratio: dict[int, torch.Tensor]
    tokens: int

    def scores(self, kind: str) -> dict[int, torch.Tensor]:
        """``gate_score`` for ``kind`` ``gate``, ``token_ratio`` for ``token``."""
        if kind not in ("gate", "token"):
            raise ValueError(f"score {kind!r}: choose gate or token")
        return self.gate_score if kind == "gate" else self.token_ratio

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "tokens": self.tokens,
            "layers": list(self.layers),
            "gate_score": {str(i): self.gate_score[i].tolist() for i in self.layers},
            "token_ratio": {str(i): self.token_ratio[i].tolist() for i in self.layers},
        }

    def save(self, path: str | Path) -> None:
        """Write the statistics as JSON (float64 values round-trip exactly through Python's repr)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RoutingStats:
        """Read what :meth:`save` wrote.

        Raises:
            ValueError: the file is not JSON, or not a routing statistics file.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a routing statistics file (no \"format\": \"{FORMAT}\")")
        layers = [int(i) for i in data["layers"]]
        as_tensors = {key: {i: torch.tensor(data[key][str(i)], dtype=torch.float64) for i in layers}
                      for key in ("gate_score", "token_ratio")}
        return cls(layers=layers, gate_score=as_tensors["gate_score"], token_ratio=as_tensors["token_ratio"],
                   tokens=int(data["tokens"]))


class _StopForward(Exception):
    """Raised by the last MoE layer's router hook: nothing after it is needed."""


def _moe_blocks(model: nn.Module) -> list[MoEBlock]:
    blocks = sorted((m for m in model.modules() if isinstance(m, MoEBlock)), key=lambda b: b.layer_idx)
    if not blocks:
        raise ValueError("the model has no MoE layer: there is no routing to measure")
    return blocks


def _as_kwargs(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    keys = ("input_ids", "position_ids", "document_ids", "attention_mask")
    return {k: batch[k].to(device) for k in keys if batch.get(k) is not None}


@torch.no_grad()
def collect_routing_stats(model: nn.Module, batches: Iterable[Batch], *, max_tokens: Optional[int] = None,
                          progress: bool = True) -> RoutingStats:
    """Run ``model`` over ``batches`` without gradients and measure each MoE layer's routing.

    Tokens are counted in row-major order (row 0's tokens first); padding (``attention_mask`` 0) is not counted.
    With ``max_tokens`` the batches are read until that many tokens are counted, the last batch only in part
    (its later tokens still run through the model, but do not count), so ``tokens == max_tokens`` whenever the
    data holds that many.

    Args:
        model: a :class:`~moetrain.models.decoder.MoEForCausalLM` (any module holding
            :class:`~moetrain.models.moe.MoEBlock` s whose ``gate`` returns a :class:`Routing`).
        batches: (B, L) ``input_ids`` tensors, or mappings of the model's keyword arguments (see :data:`Batch`).
        max_tokens: stop after this many counted tokens (None: all of ``batches``).
        progress: draw a bar in tokens on stderr when it is a terminal.

    Returns:
        the statistics (float64 on the CPU).

    Raises:
        ValueError: no MoE layer, ``max_tokens`` below 1, or no token counted.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: need at least 1 token")
    blocks = _moe_blocks(model)
    layers = [b.layer_idx for b in blocks]
    device = next(model.parameters()).device
    experts = blocks[0].gate.num_experts
    gate_sum = {i: torch.zeros(experts, dtype=torch.float64, device=device) for i in layers}  # (E,) each
    hits = {i: torch.zeros(experts, dtype=torch.float64, device=device) for i in layers}  # (E,) each
    counted = torch.zeros(0, dtype=torch.float64, device=device)  # (T,) 1 for a counted token of this batch

    def observe(layer: int, last: bool):
        def hook(module: nn.Module, args: tuple, routing: Routing) -> None:
            k = routing.topk_idx.shape[1]
            idx = routing.topk_idx.reshape(-1)  # (T * k,)
            weight = routing.topk_weight.to(torch.float64) * counted[:, None]  # (T, k)
            gate_sum[layer].index_add_(0, idx, weight.reshape(-1))
            hits[layer].index_add_(0, idx, counted[:, None].expand(-1, k).reshape(-1))
            if last:
                raise _StopForward

        return hook

    handles = [b.gate.register_forward_hook(observe(b.layer_idx, b is blocks[-1])) for b in blocks]
    was_training = model.training
    model.eval()
    bar = None
    if shown(None if progress else False):
        from tqdm.auto import tqdm

        bar = tqdm(total=max_tokens, desc="routing", unit="tok", unit_scale=True, file=sys.stderr,
                   dynamic_ncols=True, leave=False)
    tokens = 0
    try:
        iterator = iter(batches)
        while max_tokens is None or tokens < max_tokens:  # no batch is drawn once enough tokens are counted
            batch = next(iterator, None)
            if batch is None:
                break
            kwargs = _as_kwargs(batch, device)
            ids = kwargs["input_ids"]  # (B, L)
            mask = kwargs.get("attention_mask")
            valid = torch.ones(ids.numel(), dtype=torch.bool, device=device) if mask is None \
                else mask.reshape(-1).bool()  # (T,)
            if max_tokens is not None:
                # keep only the first (max_tokens - tokens) valid tokens of the batch, in row-major order
                valid = valid & (torch.cumsum(valid.long(), 0) <= max_tokens - tokens)
            counted = valid.to(torch.float64)
            try:
                model(**kwargs)
            except _StopForward:
                pass
            n = int(valid.sum())
            tokens += n
            if bar is not None:
                bar.update(n)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        if bar is not None:
            bar.close()
    if tokens == 0:
        raise ValueError("no token was counted: the batches are empty (or all padding)")
    return RoutingStats(
        layers=layers,
        gate_score={i: (gate_sum[i] / tokens).cpu() for i in layers},
        token_ratio={i: (hits[i] / tokens).cpu() for i in layers},
        tokens=tokens,
    )


def select_by_coverage(scores: dict[int, torch.Tensor], top_p: float) -> dict[int, list[int]]:
    """Per layer, the fewest experts, highest scores first, whose share of the layer's total score reaches
    ``top_p`` (ESFT's selection).

    Ties keep the lower expert index first. A share within 1e-9 of ``top_p`` counts as reaching it, so that
    ``top_p = 1`` keeps exactly the experts with a positive score despite rounding.

    Args:
        scores: layer -> (E,) non-negative scores (a :class:`RoutingStats`' ``gate_score`` or ``token_ratio``).
        top_p: in (0, 1].

    Returns:
        layer -> the selected expert indices, in increasing order (at least one per layer).

    Raises:
        ValueError: ``top_p`` out of range, a negative score, or a layer whose scores are all zero.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: need 0 < top_p <= 1")
    selected: dict[int, list[int]] = {}
    for layer, score in scores.items():
        score = score.detach().to(torch.float64).cpu()  # (E,)
        if (score < 0).any():
            raise ValueError(f"layer {layer}: negative expert scores; coverage needs scores >= 0")
        total = score.sum()
        if total <= 0:
            raise ValueError(f"layer {layer}: every expert scores 0 (no routed tokens); nothing to select from")
        ranked, order = torch.sort(score, descending=True, stable=True)  # (E,)
        covered = torch.cumsum(ranked, 0) / total  # (E,) share of the best 1, 2, ... experts
        count = min(int((covered < top_p - 1e-9).sum()) + 1, score.numel())
        selected[layer] = sorted(order[:count].tolist())
    return selected
