"""The routed experts' weights in host memory, one row per (layer, expert), optionally int8.

Row layout (the order of an expert record in the training store): ``gate_proj (I, H) | up_proj (I, H) |
down_proj (H, I)`` flattened, so a row holds P = 3 * I * H values. ``int8`` rows keep one fp32 scale per
output channel beside them: (2I + H,) scales, ``w = q * scale[:, None]`` (symmetric, 127 levels), the
plain weight-only scheme (dequantized on the device just before the expert's matmuls).

Two sources serve the rows to the :class:`~moetrain.inference.cache.ExpertCache` (:meth:`HostExpertStore.row`):
:class:`HostExpertStore` holds every row in (pinned) host memory; :class:`ShardExpertStore` holds none and reads
an expert's tensors from the model directory's memory-mapped safetensors shards when the cache misses it (for a
model larger than host memory: the page cache keeps what fits).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

_EXPERT_NAME_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_PROJ_INDEX = {"gate_proj": 0, "up_proj": 1, "down_proj": 2}


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of ``weight`` (O, K): returns (q (O, K) int8, scale (O,) fp32)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # (O,) an all-zero row keeps a usable scale
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(O, K) weights of ``dtype`` from int8 ``q`` (O, K) and fp32 ``scale`` (O,)."""
    return (q.float() * scale[:, None]).to(dtype)


class HostExpertStore:
    """Every MoE layer's expert rows in host memory (pinned when the compute device is a GPU).

    Args:
        layers: the MoE layer indices.
        num_experts, hidden_size, intermediate_size: E, H and I (the same in every MoE layer).
        dtype: the compute dtype the rows are served in.
        quantize: store int8 rows with fp32 per-channel scales instead of ``dtype``.
        pin: allocate page-locked memory (asynchronous host-to-device copies).
        allocate: allocate the rows (False: a subclass serves them otherwise).
    """

    def __init__(self, layers: Iterable[int], num_experts: int, hidden_size: int, intermediate_size: int, *,
                 dtype: torch.dtype, quantize: bool = False, pin: bool = False, allocate: bool = True) -> None:
        self.layers = sorted(layers)
        self.num_experts, self.hidden, self.width = num_experts, hidden_size, intermediate_size
        self.dtype = dtype
        self.quantized = quantize
        self.storage_dtype = torch.int8 if quantize else dtype
        ih = intermediate_size * hidden_size
        self.row_numel = 3 * ih
        self.scale_numel = 2 * intermediate_size + hidden_size if quantize else 0
        self.offsets = (0, ih, 2 * ih)  # where gate, up and down start in a row
        n = num_experts if allocate else 0
        self.rows = {layer: torch.empty((n, self.row_numel), dtype=self.storage_dtype, pin_memory=pin)
                     for layer in self.layers}
        self.scales: dict[int, Optional[torch.Tensor]] = {
            layer: torch.empty((n, self.scale_numel), dtype=torch.float32, pin_memory=pin) if quantize
            else None for layer in self.layers}

    def row(self, layer: int, expert: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The host row of ``expert`` in ``layer``: (P,) weights of the storage dtype and, when int8, (2I + H,)
        fp32 scales (else None). The cache copies them into a device slot."""
        scales = self.scales[layer]
        return self.rows[layer][expert], None if scales is None else scales[expert]

    @property
    def row_bytes(self) -> int:
        """Bytes one expert moves across the link (its weights and, when int8, its scales)."""
        return self.row_numel * torch.empty((), dtype=self.storage_dtype).element_size() + 4 * self.scale_numel

    @property
    def total_experts(self) -> int:
        return len(self.layers) * self.num_experts

    @property
    def nbytes(self) -> int:
        return self.total_experts * self.row_bytes

    def shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(gate, up, down) weight shapes: (I, H), (I, H), (H, I)."""
        return (self.width, self.hidden), (self.width, self.hidden), (self.hidden, self.width)

    @torch.no_grad()
    def put(self, layer: int, expert: int, proj: int, *, weight: torch.Tensor) -> None:
        """Store projection ``proj`` (0 gate, 1 up, 2 down) of ``expert`` in ``layer``: ``weight`` (O, K), any
        dtype and device."""
        shape = self.shapes()[proj]
        if tuple(weight.shape) != shape:
            raise ValueError(f"layer {layer} expert {expert}: projection {proj} has shape {tuple(weight.shape)}, "
                             f"expected {shape}")
        scales = self.scales[layer]
        self._write(self.rows[layer][expert], None if scales is None else scales[expert], proj, weight)

    def _write(self, row: torch.Tensor, scales: Optional[torch.Tensor], proj: int, weight: torch.Tensor) -> None:
        """Write projection ``proj`` of ``weight`` (O, K) into ``row`` (P,) and, when int8, ``scales`` (2I + H,)."""
        shape = self.shapes()[proj]
        start, n = self.offsets[proj], shape[0] * shape[1]
        if self.quantized:
            q, scale = quantize_int8(weight.detach().cpu())
            row[start:start + n].copy_(q.reshape(-1))
            scale_start = (0, self.width, 2 * self.width)[proj]
            scales[scale_start:scale_start + shape[0]].copy_(scale)
        else:
            row[start:start + n].copy_(weight.detach().reshape(-1))

    def put_named(self, name: str, weight: torch.Tensor) -> None:
        """:meth:`put` by internal parameter name (``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``): the
        ``expert_sink`` of :func:`moetrain.models.hf.load_weights`."""
        m = _EXPERT_NAME_RE.match(name)
        if m is None:
            raise ValueError(f"{name!r} is not a routed expert's weight")
        self.put(int(m.group(1)), int(m.group(2)), _PROJ_INDEX[m.group(3)], weight=weight)

    @classmethod
    def from_blocks(cls, blocks: list[nn.Module], *, dtype: Optional[torch.dtype] = None, quantize: bool = False,
                    pin: bool = False, **kwargs: Any) -> HostExpertStore:
        """A store shaped like ``blocks`` (MoE blocks, ``layer_idx`` and ``experts``), empty.

        Raises:
            ValueError: the MoE layers differ in their expert shape.
        """
        first = blocks[0].experts
        shape = (first.num_experts, first.hidden_size, first.intermediate_size)
        for block in blocks:
            e = block.experts
            if (e.num_experts, e.hidden_size, e.intermediate_size) != shape:
                raise ValueError(f"layer {block.layer_idx}: paged experts need every MoE layer to have the same "
                                 f"expert shape ({shape[0]} experts of {shape[1]}x{shape[2]})")
        if dtype is None:
            dtype = first[0].gate_proj.weight.dtype
        return cls([b.layer_idx for b in blocks], *shape, dtype=dtype, quantize=quantize, pin=pin, **kwargs)

    def fill_from(self, blocks: list[nn.Module]) -> None:
        """Copy resident experts' weights (``block.experts[e].{gate,up,down}_proj.weight``) into the rows."""
        for block in blocks:
            for e, expert in enumerate(block.experts):
                for proj, linear in enumerate((expert.gate_proj, expert.up_proj, expert.down_proj)):
                    self.put(block.layer_idx, e, proj, weight=linear.weight)


class ShardExpertStore(HostExpertStore):
    """Expert rows read from a model directory's safetensors shards on demand (nothing held in host memory).

    Each shard is opened once with ``safe_open`` (a memory map); :meth:`row` reads the expert's three
    projections (a slice of a fused (E, ...) tensor when the checkpoint stores experts fused), casts them to the
    storage dtype (or quantizes them to int8) into a fresh host row, which the cache copies into its slot.

    Args:
        model_dir: the Hugging Face model directory or moetrain checkpoint.
        family: the model family (how its on-disk names map to moetrain's).
        layers, num_experts, hidden_size, intermediate_size, dtype, quantize: as :class:`HostExpertStore`.
        skip: on-disk names to leave out (multi-token-prediction layers and the like).

    Raises:
        ShardError: a routed expert's projection that no shard holds.
    """

    def __init__(self, model_dir: str | Path, family: str, layers: Iterable[int], num_experts: int,
                 hidden_size: int, intermediate_size: int, *, dtype: torch.dtype, quantize: bool = False,
                 skip: Optional[set[str]] = None) -> None:
        super().__init__(layers, num_experts, hidden_size, intermediate_size, dtype=dtype, quantize=quantize,
                         allocate=False)
        self.model_dir = Path(model_dir)
        self.location = expert_locations(self.model_dir, family, skip or set())
        wanted = {(layer, e, p) for layer in self.layers for e in range(num_experts) for p in range(3)}
        missing = sorted(wanted - set(self.location))
        if missing:
            from moetrain.shards import ShardError

            layer, expert, proj = missing[0]
            raise ShardError(f"{self.model_dir}: no shard holds layer {layer} expert {expert}'s projection {proj} "
                             f"({len(missing)} routed expert tensors missing)")
        self._files: dict[str, Any] = {}
        self.reads = 0
        """Experts read from the shards so far."""

    def _open(self, fname: str) -> Any:
        handle = self._files.get(fname)
        if handle is None:
            from moetrain.shards import _open

            handle = self._files[fname] = _open(self.model_dir / fname).__enter__()
        return handle

    def _read(self, layer: int, expert: int, proj: int) -> torch.Tensor:
        """(O, K) weight of projection ``proj`` as stored (read from the memory map)."""
        fname, name, fused = self.location[(layer, expert, proj)]
        handle = self._open(fname)
        if fused is None:
            return handle.get_tensor(name)
        index, part = fused  # part: 0 gate rows / 1 up rows of a gate_up (E, 2I, H); None: the whole (E, H, I)
        weight = handle.get_slice(name)[index]
        return weight if part is None else weight.chunk(2, dim=0)[part]

    def row(self, layer: int, expert: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        row = torch.empty(self.row_numel, dtype=self.storage_dtype)
        scales = torch.empty(self.scale_numel, dtype=torch.float32) if self.quantized else None
        for proj in range(3):
            weight = self._read(layer, expert, proj)
            if tuple(weight.shape) != self.shapes()[proj]:
                raise ValueError(f"{self.model_dir}: layer {layer} expert {expert}: projection {proj} has shape "
                                 f"{tuple(weight.shape)}, expected {self.shapes()[proj]}")
            self._write(row, scales, proj, weight)
        self.reads += 1
        return row, scales

    def put(self, layer: int, expert: int, proj: int, *, weight: torch.Tensor) -> None:
        """Nothing to store: the shards are the rows (weights loaded with the model are dropped)."""

    def close(self) -> None:
        """Close the memory maps."""
        for handle in self._files.values():
            handle.__exit__(None, None, None)
        self._files = {}


def expert_locations(model_dir: Path, family: str, skip: set[str]) -> dict[tuple[int, int, int], tuple]:
    """Where each routed expert's projection lies in ``model_dir``'s shards, from the index alone.

    Returns:
        {(layer, expert, proj): (shard file, on-disk name, fused)}; ``fused`` is None for a per-expert tensor,
        else (expert index, part) into a fused tensor: part 0/1 the gate/up half of ``gate_up_proj`` (E, 2I, H),
        None for ``down_proj`` (E, H, I).
    """
    from moetrain.models import keymap
    from moetrain.models.hf_load import _FUSED_RE
    from moetrain.shards import read_weight_map

    found: dict[tuple[int, int, int], tuple] = {}
    fused_names: list[tuple[str, str, int, str]] = []
    for name, fname in read_weight_map(model_dir).items():
        if name in skip:
            continue
        m = _FUSED_RE.match(name)
        if m is not None:
            fused_names.append((name, fname, int(m.group(1).rsplit(".", 1)[1]), m.group(2)))
            continue
        internal = _EXPERT_NAME_RE.match(keymap.from_hf_name(family, name))
        if internal is not None:
            key = (int(internal.group(1)), int(internal.group(2)), _PROJ_INDEX[internal.group(3)])
            found[key] = (fname, name, None)
    for name, fname, layer, kind in fused_names:
        from moetrain.shards import _open

        with _open(model_dir / fname) as f:
            experts = f.get_slice(name).get_shape()[0]
        for e in range(experts):
            if kind == "gate_up_proj":
                found[(layer, e, 0)] = (fname, name, (e, 0))
                found[(layer, e, 1)] = (fname, name, (e, 1))
            else:
                found[(layer, e, 2)] = (fname, name, (e, None))
    return found
