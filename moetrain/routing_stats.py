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
cost time). The model must fit where it is. :func:`stream_routing_stats` measures a model directory larger
than the device one decoder layer at a time (only that layer's weights on the device), with the same
:class:`RoutingTally`, so that its statistics are those of :func:`collect_routing_stats` to the bit.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

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


def counted_tokens(kwargs: Mapping[str, torch.Tensor], max_tokens: Optional[int], tokens: int) -> torch.Tensor:
    """(T,) bool: the batch's tokens that count, row-major: real tokens (``attention_mask`` 1), and with
    ``max_tokens`` only the first ``max_tokens - tokens`` of them (``tokens``: counted by earlier batches)."""
    ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")  # (B, L) each
    valid = torch.ones(ids.numel(), dtype=torch.bool, device=ids.device) if mask is None \
        else mask.reshape(-1).bool()  # (T,)
    if max_tokens is not None:
        valid = valid & (torch.cumsum(valid.long(), 0) <= max_tokens - tokens)
    return valid


class RoutingTally:
    """Per-layer running sums of the routing over counted tokens, in float64 on the model's device.

    One :meth:`add` per (layer, batch); the sums depend only on the order of the batches within a layer, so a
    forward pass that visits the layers batch by batch (:func:`collect_routing_stats`) and one that visits the
    batches layer by layer (:mod:`moetrain.routing_stream`) give the same bits.

    Args:
        layers: the MoE layer indices.
        experts: E, routed experts per layer.
        device: where the sums live (the routing's device).
    """

    def __init__(self, layers: list[int], experts: int, device: torch.device) -> None:
        self.layers = list(layers)
        self.gate_sum = {i: torch.zeros(experts, dtype=torch.float64, device=device) for i in layers}  # (E,) each
        self.hits = {i: torch.zeros(experts, dtype=torch.float64, device=device) for i in layers}  # (E,) each

    def add(self, layer: int, routing: Routing, counted: torch.Tensor) -> None:
        """Add one batch's routing of ``layer``: ``counted`` (T,) float64, 1 for a counted token, else 0."""
        k = routing.topk_idx.shape[1]
        idx = routing.topk_idx.reshape(-1)  # (T * k,)
        weight = routing.topk_weight.to(torch.float64) * counted[:, None]  # (T, k)
        self.gate_sum[layer].index_add_(0, idx, weight.reshape(-1))
        self.hits[layer].index_add_(0, idx, counted[:, None].expand(-1, k).reshape(-1))

    def stats(self, tokens: int) -> RoutingStats:
        """The means over ``tokens`` counted tokens (float64 on the CPU).

        Raises:
            ValueError: no token was counted.
        """
        if tokens == 0:
            raise ValueError("no token was counted: the batches are empty (or all padding)")
        return RoutingStats(
            layers=self.layers,
            gate_score={i: (self.gate_sum[i] / tokens).cpu() for i in self.layers},
            token_ratio={i: (self.hits[i] / tokens).cpu() for i in self.layers},
            tokens=tokens,
        )


def progress_bar(total: Optional[int], progress: bool, *, desc: str = "routing", unit: str = "tok") -> Any:
    """A tqdm bar on stderr when it is a terminal and ``progress`` is on, else None."""
    if not shown(None if progress else False):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "tok", file=sys.stderr, dynamic_ncols=True,
                leave=False)


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
    device = next(model.parameters()).device
    tally = RoutingTally([b.layer_idx for b in blocks], blocks[0].gate.num_experts, device)
    counted = torch.zeros(0, dtype=torch.float64, device=device)  # (T,) 1 for a counted token of this batch

    def observe(layer: int, last: bool):
        def hook(module: nn.Module, args: tuple, routing: Routing) -> None:
            tally.add(layer, routing, counted)
            if last:
                raise _StopForward

        return hook

    handles = [b.gate.register_forward_hook(observe(b.layer_idx, b is blocks[-1])) for b in blocks]
    was_training = model.training
    model.eval()
    bar = progress_bar(max_tokens, progress)
    tokens = 0
    try:
        iterator = iter(batches)
        while max_tokens is None or tokens < max_tokens:  # no batch is drawn once enough tokens are counted
            batch = next(iterator, None)
            if batch is None:
                break
            kwargs = _as_kwargs(batch, device)
            valid = counted_tokens(kwargs, max_tokens, tokens)  # (T,)
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
    return tally.stats(tokens)


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


# ---------------------------------------------------------------------------------------------- layer by layer
@dataclass
class StreamReport:
    """What :func:`stream_routing_stats` held, measured from the model's tensors as it ran.

    Attributes:
        model_bytes: every weight of the model (what :func:`collect_routing_stats` holds on the device).
        peak_weight_bytes: the most weight bytes materialised at once (just before each layer ran).
        peak_expert_bytes: the most routed-expert weight bytes materialised at once.
        expert_layers_at_once: the most MoE layers whose routed experts were materialised at the same time.
        activation_bytes: the sample's hidden states, kept in host memory between layers.
        per_layer: decoder layer -> (weight bytes, routed-expert bytes, layers holding routed experts) measured
            while it ran.
    """

    model_bytes: int = 0
    peak_weight_bytes: int = 0
    peak_expert_bytes: int = 0
    expert_layers_at_once: int = 0
    activation_bytes: int = 0
    per_layer: dict[int, tuple[int, int, list[int]]] = field(default_factory=dict)


def _stop_with_routing(module: nn.Module, args: tuple, routing: Routing) -> None:
    """The last MoE layer's router hook: its routing is all that is needed; the exception carries it out."""
    raise _StopForward(routing)


@torch.no_grad()
def stream_routing_stats(path: str | Path, batches: Iterable[Batch], *, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32, max_tokens: Optional[int] = None,
                         progress: bool = True) -> tuple[RoutingStats, StreamReport]:
    """:func:`collect_routing_stats` of the model directory at ``path`` with one decoder layer's weights
    materialised at a time (:mod:`moetrain.models.layer_stream`)::

        embed every batch of the sample          -> (B, L, H) hidden states per batch, in host memory
        for each decoder layer up to the last MoE layer's router:
            read the layer's tensors from the shards onto ``device``
            run every batch's hidden states through it (the routing tallied as collect_routing_stats tallies it)
            give the layer's weights back

    Every weight is read once; the last MoE layer's routed experts are never read (its router's input is all
    that is needed). Each batch meets each layer with the inputs, shapes and ops of the resident forward, and
    each layer's routing is added batch by batch in the same order by the same :class:`RoutingTally`: on the
    same device the statistics equal :func:`collect_routing_stats`' to the bit.

    Args:
        path: a Hugging Face model directory, moetrain checkpoint or run directory.
        batches, max_tokens, progress: as :func:`collect_routing_stats` (the bar counts layers).
        device: where each layer runs.
        dtype: the weights' and activations' dtype.

    Returns:
        (the statistics, float64 on the CPU; what was held, measured).

    Raises:
        ValueError: no MoE layer, ``max_tokens`` below 1, or no token counted.
        ConfigError, ShardError: not a model directory, or tensors that do not match its config.
    """
    from moetrain.models import layer_stream
    from moetrain.models.hf_files import load_config, resolve_model_path

    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: need at least 1 token")
    device, path = torch.device(device), resolve_model_path(path)
    model = layer_stream.skeleton(load_config(path), dtype, device)
    blocks = _moe_blocks(model)
    tally = RoutingTally([b.layer_idx for b in blocks], blocks[0].gate.num_experts, device)
    report = StreamReport(model_bytes=layer_stream.weight_bytes(model))

    def measure(layer: int) -> None:
        held = report.per_layer[layer] = layer_stream.resident_bytes(model)
        report.peak_weight_bytes = max(report.peak_weight_bytes, held[0])
        report.peak_expert_bytes = max(report.peak_expert_bytes, held[1])
        report.expert_layers_at_once = max(report.expert_layers_at_once, len(held[2]))

    reader = layer_stream.ShardReader(path, model.config)
    embed = model.model.embed_tokens
    try:
        layer_stream.materialise(embed, "model.embed_tokens", reader, layer=None, device=device)
        report.peak_weight_bytes = layer_stream.resident_bytes(model)[0]
        sample: list[list] = []  # per batch: [its inputs (host), counted (T,) float64 (host), hidden (B, L, H)]
        tokens = 0
        iterator = iter(batches)
        while max_tokens is None or tokens < max_tokens:  # the batches collect_routing_stats would draw
            batch = next(iterator, None)
            if batch is None:
                break
            kwargs = _as_kwargs(batch, device)
            valid = counted_tokens(kwargs, max_tokens, tokens)
            tokens += int(valid.sum())
            sample.append([{k: v.cpu() for k, v in kwargs.items()}, valid.to(torch.float64).cpu(),
                           embed(kwargs["input_ids"]).cpu()])
        layer_stream.release(embed)
        if tokens == 0:
            raise ValueError("no token was counted: the batches are empty (or all padding)")
        report.activation_bytes = sum(h.numel() * h.element_size() for _, _, h in sample)
        last = blocks[-1].layer_idx
        layers = [layer for layer in model.model.layers if layer.layer_idx <= last]
        bar = progress_bar(len(layers), progress, desc="routing, layer by layer", unit="layer")
        for layer in layers:
            idx, prefix = layer.layer_idx, f"model.layers.{layer.layer_idx}"
            skip = (f"{prefix}.mlp.experts.",) if idx == last else ()
            layer_stream.materialise(layer, prefix, reader, layer=idx, device=device, skip=skip)
            measure(idx)
            hook = layer.mlp.gate.register_forward_hook(_stop_with_routing) if idx == last else None
            try:
                for entry in sample:
                    kwargs = {k: v.to(device) for k, v in entry[0].items()}
                    cos, sin, mask, valid = layer_stream.attention_inputs(model, kwargs, dtype)
                    try:
                        hidden, routing = layer(entry[2].to(device), cos, sin, mask, valid)
                        entry[2] = hidden.cpu()
                    except _StopForward as stopped:
                        routing = stopped.args[0]
                    if routing is not None:
                        tally.add(idx, routing, entry[1].to(device))
            finally:
                if hook is not None:
                    hook.remove()
            layer_stream.release(layer)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        reader.close()
    return tally.stats(tokens), report
