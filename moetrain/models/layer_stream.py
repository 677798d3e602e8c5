"""A model directory run one decoder layer at a time: only that layer's weights are on the device.

A forward pass over a sample needs every layer's weights at once. Turned around (every batch of the sample
through layer 0, then every batch through layer 1, ...), it needs one layer's weights and the sample's hidden
states between layers. This module holds the pieces, used by
:func:`moetrain.routing_stats.stream_routing_stats`:

* :func:`skeleton`: the model with every weight on the meta device (no memory) and its rotary table computed;
* :class:`ShardReader`: a layer's tensors read from the directory's safetensors shards (memory maps, each
  tensor read when its layer is), mapped to moetrain's names (fused expert tensors split);
* :func:`materialise` / :func:`release`: a module's weights allocated on the device and filled, then given back;
* :func:`attention_inputs`: a batch's rotary tables, attention mask and valid-token mask, computed as
  :meth:`~moetrain.models.decoder.MoEForCausalLM.forward` computes them, so a layer run here sees the same
  inputs as in the resident forward and computes the same bits;
* :func:`resident_bytes`: what is materialised right now, measured from the module's tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from moetrain.config import ModelConfig
from moetrain.models.attention import build_attention_mask
from moetrain.models.decoder import MoEForCausalLM

_EXPERTS = ".mlp.experts."


def skeleton(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> MoEForCausalLM:
    """A model of ``config`` in eval mode with every weight of ``dtype`` on the meta device and the rotary table
    (a computed buffer) on ``device``."""
    from moetrain.models.rope import rotary_for

    with torch.device("meta"):
        model = MoEForCausalLM(config)
    model = model.to(dtype=dtype).eval()
    model.model.rotary.register_buffer("inv_freq", rotary_for(config).inv_freq.to(device), persistent=False)
    return model


class ShardReader:
    """A model directory's tensors, one decoder layer (or the tensors outside the layers) at a time.

    Shards are opened once (memory maps) and read tensor by tensor, so reading a layer costs that layer's bytes.

    Args:
        path: a Hugging Face model directory or moetrain checkpoint (``model.safetensors[.index.json]``).
        config: its model config (family: how on-disk names map to moetrain's).
    """

    def __init__(self, path: Path, config: ModelConfig) -> None:
        from moetrain.models.hf_load import _IGNORED_RE, _LAYER_RE, _is_mtp_tensor
        from moetrain.shards import read_weight_map

        self.path, self.config = Path(path), config
        self.by_layer: dict[Optional[int], list[tuple[str, str]]] = {}  # layer (None: outside) -> (name, shard)
        for name, fname in read_weight_map(self.path).items():
            if _IGNORED_RE.search(name) or _is_mtp_tensor(config, name):
                continue
            m = _LAYER_RE.match(name)
            self.by_layer.setdefault(int(m.group(1)) if m else None, []).append((name, fname))
        self._files: dict[str, Any] = {}

    def tensors(self, layer: Optional[int]) -> Iterator[tuple[str, torch.Tensor]]:
        """(moetrain name, tensor) of every tensor of ``layer`` (None: embeddings, final norm, LM head).

        Raises:
            ShardError: a shard is missing or a tensor cannot be read.
        """
        from moetrain.models.hf_load import _internal_tensors
        from moetrain.shards import ShardError, _open

        for name, fname in self.by_layer.get(layer, []):
            handle = self._files.get(fname)
            if handle is None:
                handle = self._files[fname] = _open(self.path / fname).__enter__()
            try:
                tensor = handle.get_tensor(name)
            except Exception as err:
                raise ShardError(f"{self.path / fname}: tensor {name!r} cannot be read ({err}); the shard is "
                                 "truncated or corrupted") from None
            yield from _internal_tensors(self.config.family, name, tensor, self.path / fname)

    def close(self) -> None:
        """Close the memory maps."""
        for handle in self._files.values():
            handle.__exit__(None, None, None)
        self._files = {}


@torch.no_grad()
def materialise(module: nn.Module, prefix: str, reader: ShardReader, *, layer: Optional[int],
                device: torch.device, skip: tuple[str, ...] = ()) -> None:
    """Allocate ``module``'s weights on ``device`` and fill them from ``reader``'s tensors of ``layer``.

    Args:
        module: a part of a :func:`skeleton` (a decoder layer, the embeddings), its weights on the meta device.
        prefix: its name in the model (``model.layers.3``).
        reader: the directory.
        layer: the decoder layer whose tensors fill it (None: the tensors outside the layers).
        device: where the weights go.
        skip: name prefixes (``model.layers.3.mlp.experts.``) of submodules left on the meta device, unread.

    Raises:
        ShardError: a tensor of the wrong shape, or a weight of the module that no shard holds.
    """
    from moetrain.shards import ShardError

    for name, sub in module.named_modules():
        full = f"{prefix}.{name}." if name else f"{prefix}."
        if not any(full.startswith(s) for s in skip):
            sub.to_empty(device=device, recurse=False)
    targets = {f"{prefix}.{n}": t for n, t in module.state_dict(keep_vars=True).items() if not t.is_meta}
    seen: set[str] = set()
    for name, value in reader.tensors(layer):
        target = targets.get(name)
        if target is None:
            continue  # a tensor of another module (the LM head beside the embeddings) or of a skipped one
        if tuple(target.shape) != tuple(value.shape):
            raise ShardError(f"{reader.path}: {name!r} has shape {tuple(value.shape)}; the model expects "
                             f"{tuple(target.shape)}")
        target.copy_(value)
        seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing:
        raise ShardError(f"{reader.path}: no shard holds {missing[0]!r} ({len(missing)} tensors missing)")


def release(module: nn.Module) -> None:
    """Give ``module``'s weights back: they return to the meta device, which holds no memory."""
    module.to_empty(device=torch.device("meta"))


def attention_inputs(model: MoEForCausalLM, kwargs: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple:
    """(cos, sin, mask, valid) of a batch for every decoder layer, as the model's forward computes them (no KV
    cache): ``kwargs`` holds (B, L) ``input_ids`` and optionally ``position_ids``, ``document_ids`` and
    ``attention_mask``; mask is (B, 1, L, L) bool or None, valid (B, L) bool or None."""
    ids = kwargs["input_ids"]  # (B, L)
    b, seq = ids.shape
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(seq, device=ids.device)[None].expand(b, -1)
    cos, sin = model.model.rotary(position_ids, dtype)
    attention_mask = kwargs.get("attention_mask")
    valid = attention_mask.bool() if attention_mask is not None and not bool(attention_mask.all()) else None
    mask = build_attention_mask(b, seq, seq, device=ids.device, key_valid=valid,
                                document_ids=kwargs.get("document_ids"), sliding_window=model.config.sliding_window)
    return cos, sin, mask, valid


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight of ``model`` (parameters and persistent buffers), wherever it is (meta included)."""
    persistent = model.state_dict(keep_vars=True)
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in persistent.values()}.values())


def resident_bytes(model: nn.Module) -> tuple[int, int, list[int]]:
    """What is materialised now, measured from the model's tensors: (weight bytes, routed-expert weight bytes,
    the layers holding any routed expert weight). The meta device holds nothing; the computed rotary table is
    not a weight."""
    weights = experts = 0
    layers: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if t.is_meta:
            continue
        weights += t.numel() * t.element_size()
        if _EXPERTS in name:
            experts += t.numel() * t.element_size()
            layers.add(int(name.split(".")[2]))  # model.layers.{i}.mlp.experts...
    return weights, experts, sorted(layers)
