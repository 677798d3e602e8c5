"""How an offloaded expert's optimizer state is laid out in bytes: fp32, or compressed.

A record is one flat byte buffer, so that paging it is still one transfer. Its segments, each starting
at a multiple of :data:`SEGMENT_ALIGN` bytes::

    master   (n,) fp32 | bf16            the master weights (``master: fp32 | fp32_split | bf16_sr | bf16_kahan``)
    comp     (n,) bf16                   Kahan compensation (``bf16_kahan`` only)
    rest     (n,) int16                  the fp32 master's bits below its bf16 half (``fp32_split`` only)
    exp_avg  (n,) fp32 | bf16 | uint8    first moment (``moments: fp32 | bf16 | int8``)
    exp_avg_sq                           second moment, same dtype
    m_scale  (ceil(n / block),) fp32     per-block absmax of exp_avg (``int8`` only)
    v_scale  (ceil(n / block),) fp32     per-block absmax of exp_avg_sq (``int8`` only)

Bytes a parameter: master 4 / 4 / 2 / 4, moments 8 / 4 / 2 (+ 8 / block for the scales). The default
(fp32, fp32) is 12 bytes, the layout the engine had before compression: ``[master | exp_avg |
exp_avg_sq]``.

``fp32_split`` is the exact fp32 master stored in two halves: its nearest bf16 (``master``, what bf16 compute
weights hold) and the 16 bits that make it exact (``rest``; :func:`~moetrain.offload.quantize.split_fp32`). With
resident bf16 weights the first half never needs to cross the link (:mod:`moetrain.offload.weight_masters`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

SEGMENT_ALIGN = 64
"""Byte alignment of each segment inside a record (so that every typed view is aligned)."""

MASTER_BYTES = {"fp32": 4, "fp32_split": 4, "bf16_sr": 2, "bf16_kahan": 4}
MOMENT_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}
MASTER_DTYPE = {"fp32": torch.float32, "fp32_split": torch.bfloat16, "bf16_sr": torch.bfloat16,
                "bf16_kahan": torch.bfloat16}
WEIGHT_HELD_BYTES = {"fp32_split": 2, "bf16_sr": 2}
"""Bytes a parameter of the stored master that bf16 compute weights hold exactly (its ``master`` segment): the
formats whose host records need not page that segment when the weights are resident."""
MOMENT_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.uint8}


def state_bytes_per_param(master: str = "fp32", moments: str = "fp32", quant_block: int = 256) -> float:
    """Bytes of optimizer state one expert parameter costs in the store (and on the link, each way).

    >>> state_bytes_per_param(), state_bytes_per_param("bf16_sr", "int8", 256)
    (12.0, 4.03125)
    """
    scales = 2 * 4 / quant_block if moments == "int8" else 0.0
    return float(MASTER_BYTES[master] + 2 * MOMENT_BYTES[moments]) + scales


def rounding_seed(layer: int, expert: int, step: int) -> int:
    """Seed of the stochastic rounding of an expert's master at its AdamW step ``step``: a function of
    the record and the step only, so a resumed run draws the same bits. It seeds a ``torch.Generator`` on the
    unfused paths and keys the Philox counter of the fused GPU kernel (:mod:`moetrain.offload.fused_step`),
    whose bits are its own."""
    return (step * 1_000_003 + layer * 65_537 + expert) & 0x7FFF_FFFF


def _align(n: int, to: int = SEGMENT_ALIGN) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class StateLayout:
    """Byte offsets of the segments of one record whose parameters have ``sizes`` elements each.

    int8 blocks never straddle two parameters (each parameter's moments are quantized on their own),
    so that a checkpoint can name every quantized tensor and its scales after its parameter.

    Attributes:
        sizes: element count of each parameter, in record order; numel: their sum.
        master / moments: the format names; block: int8 quantization block.
    """

    sizes: tuple[int, ...]
    master: str = "fp32"
    moments: str = "fp32"
    block: int = 256

    @cached_property
    def numel(self) -> int:
        return sum(self.sizes)

    @cached_property
    def compressed(self) -> bool:
        return self.master != "fp32" or self.moments != "fp32"

    def blocks_of(self, size: int) -> int:
        return -(-size // self.block)

    @cached_property
    def num_blocks(self) -> int:
        return sum(self.blocks_of(s) for s in self.sizes)

    @cached_property
    def segments(self) -> list[tuple[str, int, torch.dtype]]:
        """(name, element count, dtype) in layout order."""
        n = self.numel
        seg = [("master", n, MASTER_DTYPE[self.master])]
        if self.master == "bf16_kahan":
            seg.append(("comp", n, torch.bfloat16))
        if self.master == "fp32_split":
            seg.append(("rest", n, torch.int16))
        seg += [("exp_avg", n, MOMENT_DTYPE[self.moments]), ("exp_avg_sq", n, MOMENT_DTYPE[self.moments])]
        if self.moments == "int8":
            seg += [("m_scale", self.num_blocks, torch.float32), ("v_scale", self.num_blocks, torch.float32)]
        return seg

    @cached_property
    def offsets(self) -> dict[str, tuple[int, int, torch.dtype]]:
        """Segment name -> (byte offset, element count, dtype)."""
        out, at = {}, 0
        for name, count, dtype in self.segments:
            out[name] = (at, count, dtype)
            size = count * dtype.itemsize
            at += size if not self.compressed else _align(size)  # fp32: [master | exp_avg | exp_avg_sq] back to back
        return out

    @cached_property
    def nbytes(self) -> int:
        """Bytes of the record before the store pads it to its I/O alignment."""
        name, count, dtype = self.segments[-1]
        return self.offsets[name][0] + count * dtype.itemsize

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed (count,) views of a record's bytes (``flat``: any dtype, at least :attr:`nbytes` bytes)."""
        return {name: self.view(flat, name) for name in self.offsets}

    def view(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        """The typed (count,) view of segment ``name`` of a record's bytes, without the others (hot paths)."""
        at, count, dtype = self.offsets[name]
        raw = flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
        return raw[at:at + count * dtype.itemsize].view(dtype)


class StateCodec:
    """Reads and writes the fp32 (master, exp_avg, exp_avg_sq) of a record in its stored format.

    Under the fp32 layout :meth:`decode` returns views of the record itself and :meth:`encode` has
    nothing to do: the step runs in place, as before compression. Compressed formats decode into fresh
    fp32 tensors, are stepped there, and are encoded back (quantized or rounded).
    """

    def __init__(self, layout: StateLayout) -> None:
        self.layout = layout

    @cached_property
    def whole(self) -> list[tuple[slice, slice]]:
        """The spans one quantizer call covers: the whole record when every parameter fills whole blocks
        (then no block can straddle two parameters; the common case), else one span per parameter."""
        if all(size % self.layout.block == 0 for size in self.layout.sizes):
            return [(slice(0, self.layout.numel), slice(0, self.layout.num_blocks))]
        return self.param_slices()

    def param_slices(self) -> list[tuple[slice, slice]]:
        """Per parameter: (its elements in the record, its blocks in the scale segments)."""
        out, at, blk = [], 0, 0
        for size in self.layout.sizes:
            nb = self.layout.blocks_of(size)
            out.append((slice(at, at + size), slice(blk, blk + nb)))
            at, blk = at + size, blk + nb
        return out

    def decode_master(self, flat: torch.Tensor) -> torch.Tensor:
        """The master weights (n,) in fp32 (a view under the fp32 layout)."""
        v = self.layout.views(flat)
        if self.layout.master == "fp32":
            return v["master"]
        if self.layout.master == "fp32_split":
            from moetrain.offload.quantize import join_fp32

            return join_fp32(v["master"], v["rest"])
        master = v["master"].float()
        if self.layout.master == "bf16_kahan":
            master += v["comp"].float()
        return master

    def decode_moment(self, flat: torch.Tensor, which: str) -> torch.Tensor:
        """``exp_avg`` or ``exp_avg_sq`` (n,) in fp32 (a view under fp32 moments)."""
        v = self.layout.views(flat)
        if self.layout.moments == "fp32":
            return v[which]
        if self.layout.moments == "bf16":
            return v[which].float()
        from moetrain.offload.quantize import dequantize_blockwise

        out = torch.empty(self.layout.numel, dtype=torch.float32, device=flat.device)
        scale = v["m_scale" if which == "exp_avg" else "v_scale"]
        for elems, blocks in self.whole:
            dequantize_blockwise(v[which][elems], scale[blocks], block=self.layout.block, signed=which == "exp_avg",
                                 out=out[elems])
        return out

    def decode(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(master, exp_avg, exp_avg_sq), each (n,) fp32."""
        return self.decode_master(flat), self.decode_moment(flat, "exp_avg"), self.decode_moment(flat, "exp_avg_sq")

    def encode_master(self, flat: torch.Tensor, master: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Store fp32 ``master`` (n,): copied, rounded stochastically (``generator``; nearest without
        one, e.g. when importing weights), split into bf16 + compensation, or split exactly into bf16 + rest."""
        from moetrain.offload.quantize import round_bf16_kahan, round_bf16_stochastic, split_fp32

        v = self.layout.views(flat)
        master = master.to(flat.device)  # e.g. weights on the GPU, the record in host memory
        if self.layout.master == "fp32":
            if master.data_ptr() != v["master"].data_ptr():
                v["master"].copy_(master)
        elif self.layout.master == "bf16_kahan":
            round_bf16_kahan(master, v["master"], v["comp"])
        elif self.layout.master == "fp32_split":
            split_fp32(master, v["master"], v["rest"])
        elif generator is not None:
            round_bf16_stochastic(master, v["master"], generator)
        else:
            v["master"].copy_(master)

    def encode_moment(self, flat: torch.Tensor, which: str, value: torch.Tensor) -> None:
        """Store fp32 ``value`` (n,) as ``exp_avg`` or ``exp_avg_sq`` in the record's moment format."""
        v = self.layout.views(flat)
        value = value.to(flat.device)
        if self.layout.moments != "int8":
            if value.data_ptr() != v[which].data_ptr():
                v[which].copy_(value)
            return
        from moetrain.offload.quantize import quantize_blockwise

        scale = v["m_scale" if which == "exp_avg" else "v_scale"]
        for elems, blocks in self.whole:
            quantize_blockwise(value[elems], v[which][elems], scale[blocks], block=self.layout.block,
                               signed=which == "exp_avg")

    def encode(self, flat: torch.Tensor, *, master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               generator: torch.Generator | None = None) -> None:
        """Store the stepped fp32 state back into the record."""
        self.encode_master(flat, master, generator)
        self.encode_moment(flat, "exp_avg", exp_avg)
        self.encode_moment(flat, "exp_avg_sq", exp_avg_sq)

    def clear_state(self, flat: torch.Tensor) -> None:
        """Zero every byte of the record but its master (and compensation) segments: moments, scales, the gaps
        between segments and the padding. Zero bytes are zero moments in every format (an int8 moment's scale 0
        makes any code 0; the codec itself encodes a signed zero as the codebook's 0.0, code 127, which decodes
        to the same 0), so fresh moments take no quantizer."""
        raw = flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
        written = tuple(name for name in ("master", "comp", "rest") if name in self.layout.offsets)
        end = 0
        for name in written:  # the leading segments; zero the gap before each
            at, count, dtype = self.layout.offsets[name]
            raw[end:at].zero_()
            end = at + count * dtype.itemsize
        raw[end:].zero_()

    def encode_master_part(self, flat: torch.Tensor, elems: slice, weight: torch.Tensor) -> None:
        """Store one parameter's weight (any float dtype and device) as the master of elements ``elems``: copied,
        rounded to nearest (bf16), or split into bf16 + compensation or bf16 + rest; as :meth:`encode_master` without a
        generator does for those elements."""
        views = self.layout.views(flat)
        value = weight.detach().reshape(-1).to(flat.device, torch.float32)  # no copy when it is fp32 there already
        if self.layout.master == "bf16_kahan":
            from moetrain.offload.quantize import round_bf16_kahan

            round_bf16_kahan(value, views["master"][elems], views["comp"][elems])
        elif self.layout.master == "fp32_split":
            from moetrain.offload.quantize import split_fp32

            split_fp32(value, views["master"][elems], views["rest"][elems])
        else:
            views["master"][elems].copy_(value)  # fp32, or bf16 rounded to nearest

    def encode_initial(self, flat: torch.Tensor, weights: Sequence[torch.Tensor]) -> None:
        """A fresh record: master from ``weights`` (the record's parameters in order; any float dtype, any
        device), rounded to nearest if it is bf16; moments, scales, gaps and padding zero.

        The same bytes as ``flat.zero_()`` followed by :meth:`encode_master` of the weights concatenated in
        fp32 (tests compare them), written parameter by parameter where ``flat`` lives (on the GPU when the
        store fills through it), and no byte written twice.
        """
        self.clear_state(flat)
        for (elems, _), weight in zip(self.param_slices(), weights, strict=True):
            self.encode_master_part(flat, elems, weight)

    def compute_part(self, flat: torch.Tensor, elems: slice) -> torch.Tensor:
        """What the compute weights of elements ``elems`` are, as a tensor that converts exactly to any float dtype:
        :meth:`compute_weights`'s value for those elements without decoding the whole record. A view (fp32, the
        stored bf16 under ``bf16_sr``, the bf16 half under ``fp32_split``) or, under ``bf16_kahan``, master +
        compensation in fp32."""
        views = self.layout.views(flat)
        if self.layout.master == "bf16_kahan":
            return views["master"][elems].float() + views["comp"][elems].float()
        return views["master"][elems]

    def compute_weights(self, flat: torch.Tensor, master: torch.Tensor) -> torch.Tensor:
        """What the model's compute weights become after ``master`` (fp32, as stepped) was encoded: the
        stored value (the rounded bf16 master, or bf16 master + compensation), so that compute and a
        checkpoint see the same weights. Under ``fp32_split`` they are the master's bf16 half (whatever dtype the
        compute weights have): what lets the weights hold that half for the store."""
        if self.layout.master in ("bf16_sr", "fp32_split"):
            if master.dtype == torch.bfloat16:
                return master  # the fused step hands back the stored bf16 itself (a view of flat): no new views
            return self.layout.view(flat, "master")  # the stored bf16 itself (no fp32 copy on the hot path)
        return master if self.layout.master == "fp32" else self.decode_master(flat)

    def record_generator(self, device: torch.device, seed: int) -> torch.Generator | None:
        """A generator for stochastic rounding, seeded per record and step (resumes reproduce it)."""
        if self.layout.master != "bf16_sr":
            return None
        return torch.Generator(device=device).manual_seed(seed)
