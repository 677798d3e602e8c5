"""How an offloaded expert's optimizer state is laid out in bytes: fp32, or compressed.

A record is one flat byte buffer, so that paging it is still one transfer. Its segments, each starting
at a multiple of :data:`SEGMENT_ALIGN` bytes::

    master   (n,) fp32 | bf16            the master weights (``master: fp32 | bf16_sr | bf16_kahan``)
    comp     (n,) bf16                   Kahan compensation (``bf16_kahan`` only)
    exp_avg  (n,) fp32 | bf16 | uint8    first moment (``moments: fp32 | bf16 | int8``)
    exp_avg_sq                           second moment, same dtype
    m_scale  (ceil(n / block),) fp32     per-block absmax of exp_avg (``int8`` only)
    v_scale  (ceil(n / block),) fp32     per-block absmax of exp_avg_sq (``int8`` only)

Bytes a parameter: master 4 / 2 / 4, moments 8 / 4 / 2 (+ 8 / block for the scales). The default
(fp32, fp32) is 12 bytes, the layout the engine had before compression: ``[master | exp_avg |
exp_avg_sq]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SEGMENT_ALIGN = 64
"""Byte alignment of each segment inside a record (so that every typed view is aligned)."""

MASTER_BYTES = {"fp32": 4, "bf16_sr": 2, "bf16_kahan": 4}
MOMENT_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}
MASTER_DTYPE = {"fp32": torch.float32, "bf16_sr": torch.bfloat16, "bf16_kahan": torch.bfloat16}
MOMENT_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.uint8}


def state_bytes_per_param(master: str = "fp32", moments: str = "fp32", quant_block: int = 256) -> float:
    """Bytes of optimizer state one expert parameter costs in the store (and on the link, each way).

    >>> state_bytes_per_param(), state_bytes_per_param("bf16_sr", "int8", 256)
    (12.0, 4.03125)
    """
    scales = 2 * 4 / quant_block if moments == "int8" else 0.0
    return float(MASTER_BYTES[master] + 2 * MOMENT_BYTES[moments]) + scales


def _align(n: int, to: int = SEGMENT_ALIGN) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class StateLayout:
    """Byte offsets of the segments of one record of ``numel`` parameters.

    Attributes:
        master / moments: the format names; block: int8 quantization block.
        offsets: segment name -> (byte offset, element count, dtype).
        nbytes: bytes of the record before the store pads it to its I/O alignment.
    """

    numel: int
    master: str = "fp32"
    moments: str = "fp32"
    block: int = 256

    @property
    def compressed(self) -> bool:
        return self.master != "fp32" or self.moments != "fp32"

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.block)

    @property
    def segments(self) -> list[tuple[str, int, torch.dtype]]:
        """(name, element count, dtype) in layout order."""
        n = self.numel
        seg = [("master", n, MASTER_DTYPE[self.master])]
        if self.master == "bf16_kahan":
            seg.append(("comp", n, torch.bfloat16))
        seg += [("exp_avg", n, MOMENT_DTYPE[self.moments]), ("exp_avg_sq", n, MOMENT_DTYPE[self.moments])]
        if self.moments == "int8":
            seg += [("m_scale", self.num_blocks, torch.float32), ("v_scale", self.num_blocks, torch.float32)]
        return seg

    @property
    def offsets(self) -> dict[str, tuple[int, int, torch.dtype]]:
        out, at = {}, 0
        for name, count, dtype in self.segments:
            out[name] = (at, count, dtype)
            # fp32 records keep the three parts back to back (no gaps), as before compression
            size = count * dtype.itemsize
            at += size if not self.compressed else _align(size)
        return out

    @property
    def nbytes(self) -> int:
        name, count, dtype = self.segments[-1]
        at = self.offsets[name][0]
        return at + count * dtype.itemsize

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of a record's bytes. ``flat``: a uint8 buffer of at least :attr:`nbytes` bytes,
        or (the fp32 layout) a float32 buffer, viewed as bytes here."""
        raw = flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
        return {name: raw[at:at + count * dtype.itemsize].view(dtype)
                for name, (at, count, dtype) in self.offsets.items()}
