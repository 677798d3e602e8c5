"""What trains: the ``model.train`` recipe setting, and freezing everything else.

``model.train: all`` (the default) trains every parameter. A mapping chooses per group::

    model:
      train:
        embeddings: false          # model.embed_tokens
        attention: false           # every layer's self_attn (projections, q/k and latent norms)
        norms: false               # the layers' input/post-attention RMSNorms and the final norm
        routers: false             # every MoE layer's gate (E, H)
        shared_experts: false      # DeepSeek's shared_experts, Qwen2-MoE's shared_expert and its gate
        dense_mlp: false           # the MLP of dense (non-MoE) layers
        lm_head: false             # the output projection (tied to the embeddings: both or neither)
        routed_experts: esft.json  # all | none | a selection file written by ``moetrain select-experts``

Every group defaults to ``true``, so ``train: {routers: false}`` freezes the routers only and an ESFT recipe
names every group it freezes.

A frozen parameter gets ``requires_grad = False``: autograd computes no gradient for it (``.grad`` stays None)
and the optimizers take only parameters that require gradients, so it has no optimizer state and AdamW never
touches it (no weight decay, no moment decay): it stays bit-identical. Routed experts are separate parameters
per expert (``mlp.experts.{e}.*``, views of one packed tensor only for the grouped GEMM), so an expert is
frozen by itself, with no gradient mask: masking the gradient of a stacked weight would not do, because AdamW
still decays a zero-gradient row and moves it by its moments.

Frozen routers: the routing does not change, so the auxiliary (balance and z) loss is **reported only**: its
value is still in ``aux_loss`` and the metrics, detached from the graph, so it moves no parameter (it would
otherwise pull the hidden states, and through them the experts, toward balance). DeepSeek-V3's
auxiliary-loss-free bias update is independent of the router weights; ``bias_update_speed`` sets it
(``null``: ``model.config.bias_update_speed``; ``0`` freezes the bias).

Every offload tier takes a selection: the offload engine keeps state only for the routed experts that train
(frozen experts have no record in its store, nothing in host memory or on NVMe, nothing paged, never stepped;
see :mod:`moetrain.offload.frozen`), and the grouped expert GEMMs compute no weight gradient for them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch.nn as nn
import yaml

from moetrain.config import ConfigError
from moetrain.models.router import TopKRouter

GROUPS: tuple[str, ...] = ("embeddings", "attention", "norms", "routers", "shared_experts", "dense_mlp", "lm_head",
                           "routed_experts")
"""The parameter groups ``model.train`` chooses; every parameter of a model belongs to exactly one."""
SELECTION_FORMAT = "moetrain-expert-selection"


@dataclass
class TrainSelection:
    """Which parameter groups train (the ``model.train`` section; ``all`` is this with every default)."""

    embeddings: bool = True
    """Train the token embeddings (``model.embed_tokens``)."""
    attention: bool = True
    """Train every layer's attention (projections, and the q/k or latent norms inside it)."""
    norms: bool = True
    """Train the layers' input and post-attention RMSNorms and the final norm."""
    routers: bool = True
    """Train the MoE routers (``mlp.gate``). Frozen: the auxiliary loss is reported only (no gradient)."""
    shared_experts: bool = True
    """Train the shared experts (DeepSeek ``shared_experts``; Qwen2-MoE ``shared_expert`` and its gate)."""
    dense_mlp: bool = True
    """Train the MLPs of the dense (non-MoE) layers."""
    lm_head: bool = True
    """Train the output projection (with tied embeddings it must equal ``embeddings``)."""
    routed_experts: str = "all"
    """``all``, ``none``, or a selection file of ``moetrain select-experts`` (the experts listed train, per layer;
    a layer the file does not list trains none)."""
    bias_update_speed: Optional[float] = None
    """DeepSeek-V3 auxiliary-loss-free balancing: the routing bias's change per step (``null``: the model
    config's ``bias_update_speed``; ``0`` freezes the bias). Independent of ``routers``."""

    @property
    def is_all(self) -> bool:
        """Whether everything trains (routed experts included)."""
        return all(getattr(self, g) for g in GROUPS[:-1]) and self.routed_experts == "all"


@dataclass
class TrainSummary:
    """What :func:`apply_train_selection` did.

    Attributes:
        trained: parameters (elements) that train.
        frozen: parameters (elements) frozen.
        groups: group -> (trained, frozen) elements.
        routed_experts: MoE layer -> the routed experts that train.
        aux_loss: ``trained`` (the aux loss has a gradient) or ``reported`` (frozen routers: value only).
        bias_update_speed: the speed for :class:`~moetrain.models.balance.BiasBalancer` (0: frozen bias).
    """

    trained: int
    frozen: int
    groups: dict[str, tuple[int, int]]
    routed_experts: dict[int, list[int]]
    aux_loss: str
    bias_update_speed: float
    hooks: list[Any] = field(default_factory=list, repr=False)

    def describe(self) -> str:
        """One line: trained and frozen counts, and the groups that are frozen."""
        frozen = [g for g, (t, f) in self.groups.items() if f and not t]
        partial = [g for g, (t, f) in self.groups.items() if f and t]
        total = self.trained + self.frozen
        parts = [f"training {self.trained / 1e6:.2f} M of {total / 1e6:.2f} M parameters "
                 f"({100 * self.trained / max(total, 1):.1f}%)"]
        if frozen:
            parts.append("frozen: " + ", ".join(frozen))
        if partial:
            chosen = sum(len(v) for v in self.routed_experts.values())
            parts.append(f"partly trained: {', '.join(partial)} ({chosen} routed experts)")
        if self.aux_loss == "reported":
            parts.append("aux loss reported only (frozen routers)")
        return "; ".join(parts)


def load_expert_selection(path: str | Path) -> dict[int, list[int]]:
    """MoE layer -> selected experts, from a selection file (JSON or YAML with an ``experts`` mapping).

    Raises:
        ConfigError: a missing or malformed file, naming ``model.train.routed_experts``.
    """
    path = Path(path)
    key = "model.train.routed_experts"
    if not path.is_file():
        raise ConfigError(f"{key}: selection file {path} not found (relative paths start at the current directory); "
                          "write one with `moetrain select-experts --config RECIPE --out FILE`, or use all or none")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: {path} is not valid JSON or YAML ({err})") from None
    experts = data.get("experts") if isinstance(data, dict) else None
    if not isinstance(experts, dict):
        raise ConfigError(f"{key}: {path} has no 'experts' mapping of layer -> expert indices; is it a selection "
                          "file written by `moetrain select-experts`?")
    try:
        return {int(layer): sorted({int(e) for e in ids}) for layer, ids in experts.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {path}: 'experts' must map layer numbers to lists of expert numbers") from None


def resolve_train_selection(train: Union[str, dict, TrainSelection, None], *,
                            offload_tier: str = "none") -> TrainSelection:
    """The :class:`TrainSelection` of a ``model.train`` value, checked before the model is built.

    Args:
        train: ``all`` (or None), a mapping of :class:`TrainSelection` fields, or one.
        offload_tier: ``model.offload.placement.tier`` (every tier takes any selection: the engine keeps no state for
            frozen experts).

    Raises:
        ConfigError: an unknown value or key, a missing selection file, a negative bias speed, or nothing left to
            train.
    """
    if train is None or train == "all":
        return TrainSelection()
    if isinstance(train, str):
        raise ConfigError(f"model.train={train!r}: use all, or a mapping of {', '.join(GROUPS)} (see "
                          "moetrain/models/train_selection.py)")
    if isinstance(train, dict):
        unknown = sorted(set(train) - {f.name for f in dataclasses.fields(TrainSelection)})
        if unknown:
            raise ConfigError(f"model.train: unknown key(s) {', '.join(unknown)}; known: {', '.join(GROUPS)}, "
                              "bias_update_speed")
        train = TrainSelection(**train)
    selection = dataclasses.replace(train)
    if selection.routed_experts not in ("all", "none"):
        load_expert_selection(selection.routed_experts)  # fail now, not after a build of minutes
    if selection.bias_update_speed is not None and selection.bias_update_speed < 0:
        raise ConfigError(f"model.train.bias_update_speed={selection.bias_update_speed} must be >= 0 (0 freezes the "
                          "bias) or null (the model config's)")
    if not any(getattr(selection, g) for g in GROUPS[:-1]) and selection.routed_experts == "none":
        raise ConfigError("model.train freezes every group: nothing would train; set at least one group to true or "
                          "model.train.routed_experts to all or a selection file")
    return selection


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.")


def parameter_group(name: str, is_moe_layer) -> tuple[str, Optional[int], Optional[int]]:
    """(group, MoE layer or None, routed expert or None) of the parameter ``name`` of a
    :class:`~moetrain.models.decoder.MoEForCausalLM`; ``is_moe_layer(i)`` tells MoE layers from dense ones.

    Raises:
        ConfigError: a parameter no group names (a new module must be placed in a group here).
    """
    if name.startswith("model.embed_tokens."):
        return "embeddings", None, None
    if name.startswith("lm_head."):
        return "lm_head", None, None
    if name.startswith("model.norm."):
        return "norms", None, None
    match = _LAYER.match(name)
    if match is not None:
        layer, rest = int(match.group(1)), match.group(2)
        if rest.startswith("self_attn."):
            return "attention", layer, None
        if rest.startswith(("input_layernorm.", "post_attention_layernorm.")):
            return "norms", layer, None
        if rest.startswith("mlp."):
            if not is_moe_layer(layer):
                return "dense_mlp", layer, None
            expert = _EXPERT.match(rest)
            if expert is not None:
                return "routed_experts", layer, int(expert.group(1))
            if rest.startswith("mlp.gate."):
                return "routers", layer, None
            if rest.startswith(("mlp.shared_experts.", "mlp.shared_expert.", "mlp.shared_expert_gate.")):
                return "shared_experts", layer, None
    raise ConfigError(f"parameter {name} is in no model.train group; place it in "
                      "moetrain.models.train_selection.parameter_group")


def _detach_aux(module: nn.Module, args: tuple, routing: Any) -> Any:
    """Forward hook of a frozen router: the aux loss keeps its value and loses its gradient."""
    return dataclasses.replace(routing, aux_loss=routing.aux_loss.detach())


def apply_train_selection(model: nn.Module, selection: Union[str, dict, TrainSelection, None]) -> TrainSummary:
    """Freeze what ``selection`` does not train: ``requires_grad = False`` on every frozen parameter.

    Call it after the model is built and before the optimizer is: the optimizers take only parameters that
    require gradients, so frozen ones get no state. With frozen routers a forward hook on each
    :class:`~moetrain.models.router.TopKRouter` detaches its aux loss (reported only).

    Args:
        model: a :class:`~moetrain.models.decoder.MoEForCausalLM`.
        selection: what :func:`resolve_train_selection` takes (resolved here again if not yet).

    Returns:
        the counts of trained and frozen parameters by group, and the routed experts that train per layer.

    Raises:
        ConfigError: a selection file naming a layer that is not an MoE layer or an expert out of range, or
            tied embeddings with ``embeddings`` and ``lm_head`` set differently.
    """
    if not isinstance(selection, TrainSelection):
        selection = resolve_train_selection(selection)
    config = model.config
    moe_layers = list(config.moe_layers)
    speed = config.bias_update_speed if selection.bias_update_speed is None else selection.bias_update_speed
    if speed > 0 and config.topk_method != "noaux_tc":
        raise ConfigError(f"model.train.bias_update_speed={speed}: only topk_method 'noaux_tc' has a routing bias "
                          f"to update (the model routes with {config.topk_method!r})")
    if selection.is_all:  # today's behaviour: nothing is touched (whatever the model's parameters are named)
        total = sum(p.numel() for p in model.parameters())
        return TrainSummary(trained=total, frozen=0, groups={}, aux_loss="trained", bias_update_speed=float(speed),
                            routed_experts={i: list(range(config.num_experts)) for i in moe_layers})
    if selection.routed_experts == "all":
        chosen = {i: list(range(config.num_experts)) for i in moe_layers}
    elif selection.routed_experts == "none":
        chosen = {i: [] for i in moe_layers}
    else:
        listed = load_expert_selection(selection.routed_experts)
        source = f"model.train.routed_experts: {selection.routed_experts}"
        wrong = sorted(set(listed) - set(moe_layers))
        if wrong:
            raise ConfigError(f"{source} names layer(s) {wrong} but the model's MoE layers are {moe_layers}; was it "
                              "selected for another model?")
        for layer, ids in listed.items():
            if ids and (ids[0] < 0 or ids[-1] >= config.num_experts):
                raise ConfigError(f"{source}: layer {layer} names expert {ids[-1] if ids[-1] >= 0 else ids[0]} but "
                                  f"the model has {config.num_experts} routed experts per layer")
        chosen = {i: listed.get(i, []) for i in moe_layers}
    if config.tie_word_embeddings and selection.embeddings != selection.lm_head:
        raise ConfigError(f"model.train.embeddings={selection.embeddings} and model.train.lm_head={selection.lm_head}: "
                          "the model ties its embeddings to the LM head (one parameter); set both the same")
    counts = {g: [0, 0] for g in GROUPS}
    chosen_sets = {i: set(ids) for i, ids in chosen.items()}
    for name, param in model.named_parameters():
        group, layer, expert = parameter_group(name, config.is_moe_layer)
        if group == "routed_experts":
            trains = expert in chosen_sets.get(layer, set())
        else:
            trains = bool(getattr(selection, group))
        if not trains:
            param.requires_grad_(False)
        counts[group][0 if trains else 1] += param.numel()
    if not any(t for t, _ in counts.values()):
        raise ConfigError("model.train freezes every parameter: nothing would train (the selection file lists no "
                          "expert and every group is false)")
    hooks = []
    if not selection.routers:
        hooks = [m.register_forward_hook(_detach_aux) for m in model.modules() if isinstance(m, TopKRouter)]
    trained = sum(t for t, _ in counts.values())
    frozen = sum(f for _, f in counts.values())
    return TrainSummary(trained=trained, frozen=frozen, groups={g: (t, f) for g, (t, f) in counts.items()},
                        routed_experts=chosen, aux_loss="trained" if selection.routers else "reported",
                        bias_update_speed=float(speed), hooks=hooks)
