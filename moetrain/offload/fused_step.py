"""One fused GPU kernel for the AdamW step of compressed expert state, several records a launch.

The unfused step of a compressed record decodes it into fp32 scratch, runs torch's fused AdamW there and encodes
it back: dozens of small kernels a record (about 1.7 ms an expert of DeepSeek-MoE-16B on an H200, where the
record's bytes take a few tens of microseconds to read and write). Here one Triton kernel
(:mod:`moetrain.offload.fused_step_kernels`) reads each quantization block of a record once (gradient, master,
moments and their scales), steps it in registers and writes it back in the record's format::

    g       bf16 | fp32 gradient (None: zeros), divided by grad_scale (1 / clip coefficient) when given
    decode  master fp32 | bf16 | bf16 half + int16 rest; moments fp32 | bf16 | int8 (codebook[code] * block absmax)
    AdamW   decoupled decay, bias-corrected moments, eps after the square root (torch.optim.AdamW's update)
    encode  master: fp32, bf16 rounded stochastically, or split exactly (split_fp32); moments: fp32, bf16 (nearest
            even), or int8 (new block absmax, nearest code: the count of codebook midpoints below the value, as
            torch.bucketize counts)

Supported: master ``fp32``, ``fp32_split`` or ``bf16_sr`` with moments ``fp32``, ``bf16`` or ``int8`` (not
fp32/fp32, which torch's fused AdamW steps in place already, nor ``bf16_kahan``, which keeps the unfused path),
quantization blocks up to :data:`MAX_BLOCK`. The unfused path stays the fallback (CPU, no triton, other formats) and
the reference of the tests.

**Stochastic rounding bits.** The bf16 master is rounded with the rule of
:func:`~moetrain.offload.quantize.round_bf16_stochastic` (16 random bits added below bf16's mantissa, then
truncation), but its bits come from Triton's counter-based Philox (``tl.randint``) keyed by
:func:`~moetrain.offload.state_format.rounding_seed` (layer, expert, step) and counted by the element's index in
the record, not from a ``torch.Generator``: deterministic, so a resumed run draws the same bits, but not the bits
the unfused path draws. Both are unbiased; the fused and unfused paths agree on the set of values each element
may take (its two bf16 neighbours), not on which one.

**Arithmetic.** fp32 in the order of ``torch.optim.AdamW``'s loop: the moments formed as torch's ``lerp_`` and
``addcmul_`` form them on the CPU (the CPU tests compare moments, int8 codes and scales bit for bit), the decay as
``p - lr*wd*p`` rounded once. Every multiply-add is an explicit fma, division and square root are IEEE-rounded and
the compiler's own mul+add contraction is off (``enable_fp_fusion=False``), so the compiled kernel and Triton's CPU
interpreter (``TRITON_INTERPRET=1``, how the CPU tests run it) compute the same bits. On the GPU the unfused path
runs torch's fused CUDA AdamW, which keeps some intermediates in fp64: the two agree to an ulp or so, and an int8
code or a bf16 moment differs only where the value sits that close to a codebook midpoint or a rounding boundary.

``MOETRAIN_FUSED_STEP=0`` in the environment forces the unfused path (read at every step: benchmarks and tests
switch it).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Optional

import torch

from moetrain.models.kernel_switch import launch_device, switched_on, triton_importable
from moetrain.offload.quantize import _code
from moetrain.offload.state_format import MASTER_DTYPE, MOMENT_DTYPE, StateLayout, rounding_seed

if TYPE_CHECKING:
    from moetrain.offload.store import ExpertRecord
    from moetrain.optim import OptimizerConfig

KERNELS = "moetrain.offload.fused_step_kernels"
"""The kernels' module (it imports triton at the top)."""

ENV = "MOETRAIN_FUSED_STEP"
"""Environment variable: ``0`` forces the unfused step."""

MAX_BLOCK = 4096
"""Largest int8 quantization block the kernel takes (a block is one row of a program's tile)."""

TILE = 256
"""Elements a program steps on the GPU (rows of whole quantization blocks under int8: one 256-element block). The
kernel is bound by its arithmetic, not by memory, and large tiles cost it registers: on an H200 (run r33,
``scripts/probe_fused_kernel.py``) a DeepSeek-MoE-16B expert under ``bf16_sr`` + int8 took 0.274 ms with 2048
elements and 8 warps a program, 0.116 ms with 256 and 2 (``fp32_split`` + int8: 0.252 and 0.103 ms)."""

INTERPRETER_TILE = 2048
"""Elements a program steps in Triton's CPU interpreter (the CPU tests): it runs a program's tile as numpy arrays,
so fewer, larger programs run faster there. The bits do not depend on the tile."""

NUM_WARPS = 2
"""Warps a program (a GPU tuning knob, like :data:`TILE`; the benchmark can set both)."""

PARAMS_PER_LAUNCH = 3
"""Parameters one launch steps (an expert's gate, up and down projections)."""

RECORDS_PER_LAUNCH = 16
"""Records one launch steps at most (a knob like :data:`TILE`): each adds a row to the launch's metadata, where
a launch of its own cost some 0.1 ms of host time a record."""

META = 9
"""int64 fields of a record's row of launch metadata: byte offset, three gradient offsets, has-gradient bits, seed,
three compute-weight offsets (``weight_masters``; else 0)."""


def enabled() -> bool:
    """False when ``MOETRAIN_FUSED_STEP=0`` forces the unfused step."""
    return switched_on(ENV)


def supports(layout: StateLayout) -> bool:
    """The kernel handles this record format (whatever the device)."""
    return (layout.compressed and layout.master in ("fp32", "fp32_split", "bf16_sr")
            and layout.moments in ("fp32", "bf16", "int8")
            and (layout.moments != "int8" or layout.block <= MAX_BLOCK))


def fused_step_available(layout: StateLayout, device: torch.device) -> bool:
    """Records of ``layout`` in slots on ``device`` are stepped by the fused kernel: a CUDA device, a supported
    compressed format, triton importable, and not switched off by ``MOETRAIN_FUSED_STEP=0``."""
    return device.type == "cuda" and enabled() and supports(layout) and triton_importable()


@lru_cache(maxsize=8)
def code_table(device: torch.device) -> torch.Tensor:
    """(1024,) fp32 on ``device``: signed codebook (255) | its midpoints (254) | unsigned codebook (256) | its
    midpoints (255), each padded to 256 (codes with 0, midpoints with +inf). The same fp32 values the torch
    quantizer uses, so decoding is exact and encoding matches ``bucketize``."""
    table = torch.zeros(1024, dtype=torch.float32)
    for at, signed in ((0, True), (512, False)):
        code, mids = _code(signed, torch.device("cpu"))
        table[at:at + code.numel()] = code
        table[at + 256:at + 512] = float("inf")
        table[at + 256:at + 256 + mids.numel()] = mids
    return table.to(device)


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a record: up to :data:`PARAMS_PER_LAUNCH` parameters.

    Attributes:
        params: indices of its parameters in the record.
        sizes / starts / block_starts: per slot (padded with 0): elements, first element in the record, first
            quantization block in the scale segments.
        grid: (programs along the longest parameter, parameters).
    """

    params: tuple[int, ...]
    sizes: tuple[int, int, int]
    starts: tuple[int, int, int]
    block_starts: tuple[int, int, int]
    grid: tuple[int, int]


@dataclass(frozen=True)
class Geometry:
    """A program's tile: ``rows`` blocks of ``block`` elements (``block_p2``: the power of two the tile spans)."""

    block: int
    block_p2: int
    rows: int


def geometry(layout: StateLayout, tile: int) -> Geometry:
    """int8: whole quantization blocks, ``tile`` elements' worth; else a single row of ``tile`` elements."""
    if layout.moments != "int8":
        return Geometry(tile, tile, 1)
    block_p2 = 1 << (layout.block - 1).bit_length()
    return Geometry(layout.block, block_p2, max(1, tile // block_p2))


@lru_cache(maxsize=64)
def launches(layout: StateLayout, tile: int) -> tuple[Launch, ...]:
    """The record's launches (one for an expert of three parameters)."""
    geo = geometry(layout, tile)
    starts, block_starts, at, blk = [], [], 0, 0
    for size in layout.sizes:
        starts.append(at)
        block_starts.append(blk)
        at, blk = at + size, blk + layout.blocks_of(size)
    out = []
    for first in range(0, len(layout.sizes), PARAMS_PER_LAUNCH):
        idx = tuple(range(first, min(first + PARAMS_PER_LAUNCH, len(layout.sizes))))
        pad = (0,) * (PARAMS_PER_LAUNCH - len(idx))

        def pick(values: list[int], idx: tuple[int, ...] = idx, pad: tuple[int, ...] = pad) -> tuple[int, int, int]:
            return tuple(values[i] for i in idx) + pad

        longest = max(layout.sizes[i] for i in idx)
        blocks = -(-longest // geo.block)
        programs = -(-blocks // geo.rows)  # tiles of ``rows`` blocks along the longest parameter
        out.append(Launch(idx, pick(list(layout.sizes)), pick(starts), pick(block_starts), (programs, len(idx))))
    return tuple(out)


def _record_grads(rec: ExpertRecord) -> list[Optional[torch.Tensor]]:
    """The record's parameters' gradients, contiguous (the kernel reads them flat from their first element) or None;
    of mixed dtypes, fp32 copies (one dtype a launch). Not reshaped: the kernel needs their addresses only, and a
    view of each, three a record and 5 000 a step, was a tenth of the step's host time."""
    grads = [None if p.grad is None else p.grad if p.grad.is_contiguous() else p.grad.contiguous()
             for p in rec.params]
    if len({g.dtype for g in grads if g is not None}) > 1:
        grads = [g if g is None else g.float() for g in grads]
    return grads


def fused_step_(rec: ExpertRecord, flat: torch.Tensor, *, lr: float, weight_decay: float, cfg: OptimizerConfig,
                step: int, grad_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One AdamW step of ``rec`` whose state is the record bytes ``flat`` (a device slot), in place; returns the
    stored master, (n,) fp32 or bf16 (``fp32_split``: its bf16 half), a view of ``flat`` (what the compute weights
    become). :func:`fused_step_many_` of one record.

    Gradients are the record's parameters' ``.grad`` (bf16 or fp32, shaped like the parameters; None reads as
    zero); ``grad_scale``: 0-d fp32 tensor on the device that divides them (``1 / clip_coef``), or None.
    ``step``: the record's AdamW step number after this update (bias corrections and the rounding seed).
    """
    return fused_step_many_([(rec, flat)], steps=[step], lr=lr, weight_decay=weight_decay, cfg=cfg,
                            grad_scale=grad_scale)[0]


def fused_step_many_(pairs: Sequence[tuple[ExpertRecord, torch.Tensor]], *, steps: Sequence[int], lr: float,
                     weight_decay: float, cfg: OptimizerConfig, grad_scale: Optional[torch.Tensor] = None,
                     weight_masters: bool = False) -> list[torch.Tensor]:
    """:func:`fused_step_` of each (record, its bytes) at its ``steps[i]``, in as few launches as the records allow:
    records of one layout, one step number and one gradient dtype share a launch, :data:`RECORDS_PER_LAUNCH` at
    most (the host's cost of a launch, a large part of the optimizer step's host time, is then shared). Returns
    each record's stored master (a view of its bytes).

    ``weight_masters``: the records' bf16 master is their compute weights (``rec.params``, bf16 and contiguous;
    ``bf16_sr`` or ``fp32_split``): the kernel reads and writes it there, the bytes' master segment is neither read
    nor written (it may not even exist, see :meth:`~moetrain.offload.swapper.Swapper.grow_hot_cache`), and the
    compute weights need no write after the step. Returns nothing then."""
    kernels = importlib.import_module(KERNELS)  # imports triton; sys.modules' entry (the tests swap it)
    grads = [_record_grads(rec) for rec, _ in pairs]
    groups: dict[tuple, list[int]] = {}
    for i, ((rec, flat), step) in enumerate(zip(pairs, steps, strict=True)):
        assert rec.layout is not None and supports(rec.layout), rec.layout
        dtype = next((g.dtype for g in grads[i] if g is not None), None)
        groups.setdefault((rec.layout, int(step), dtype, flat.device), []).append(i)
    for (_, step, _, device), members in groups.items():
        table = code_table(device)
        with launch_device(device):
            for at in range(0, len(members), RECORDS_PER_LAUNCH):
                chunk = members[at:at + RECORDS_PER_LAUNCH]
                _launch(kernels, [pairs[i] for i in chunk], [grads[i] for i in chunk], grad_scale, table,
                        lr=lr, weight_decay=weight_decay, cfg=cfg, step=step, weight_masters=weight_masters)
    return [] if weight_masters else [rec.layout.view(flat, "master") for rec, flat in pairs]


def _offset(t: torch.Tensor, base_ptr: int, item: int) -> int:
    """Elements of ``item`` bytes from address ``base_ptr`` to ``t``'s first (one dtype)."""
    diff = t.data_ptr() - base_ptr
    assert diff % item == 0, "tensors must be aligned to their element size"
    return diff // item


def _meta_rows(pairs: Sequence[tuple[ExpertRecord, torch.Tensor]], grads: Sequence[list[Optional[torch.Tensor]]],
               params: tuple[int, ...], base: Optional[torch.Tensor], step: int,
               weights: Optional[torch.Tensor] = None) -> list[list[int]]:
    """The kernel's (records, META) metadata of one launch over parameters ``params`` of each record: the byte
    offset of its bytes from the first record's, its gradients' element offsets from ``base`` (0 where absent),
    its has-gradient bits, its rounding seed and its compute weights' element offsets from ``weights`` (when
    given)."""
    first = pairs[0][1].data_ptr()
    g_base, g_item = (base.data_ptr(), base.element_size()) if base is not None else (0, 1)
    w_base, w_item = (weights.data_ptr(), weights.element_size()) if weights is not None else (0, 1)
    rows = []
    for (rec, flat), gs in zip(pairs, grads, strict=True):
        at = flat.data_ptr() - first
        assert at % 4 == 0, "records must be aligned to 4 bytes"
        offsets, bits = [0] * PARAMS_PER_LAUNCH, 0
        for j, i in enumerate(params):
            g = gs[i]
            if g is None:
                continue
            offsets[j], bits = _offset(g, g_base, g_item), bits | 1 << j
        at_weights = [0] * PARAMS_PER_LAUNCH
        if weights is not None:
            for j, i in enumerate(params):
                p = rec.params[i]  # the Parameter itself: its .data would be a new tensor each call
                assert p.dtype == weights.dtype and p.is_contiguous(), "weight masters: contiguous bf16 weights"
                at_weights[j] = _offset(p, w_base, w_item)
        rows.append([at, *offsets, bits, rounding_seed(rec.layer, rec.expert, step), *at_weights])
    return rows


def _launch(kernels, pairs: Sequence[tuple[ExpertRecord, torch.Tensor]],
            grads: Sequence[list[Optional[torch.Tensor]]], grad_scale: Optional[torch.Tensor], table: torch.Tensor, *,
            lr: float, weight_decay: float, cfg: OptimizerConfig, step: int, weight_masters: bool = False) -> None:
    """The kernel launches of records of one layout at one step (see :func:`fused_step_many_`): one a group of up
    to three parameters, over every record."""
    layout = pairs[0][0].layout
    views = layout.views(pairs[0][1])  # the first record's segments; the others are found by their byte offsets
    int8 = layout.moments == "int8"
    beta1, beta2 = cfg.betas
    bias_correction1 = 1 - beta1 ** float(step)
    bias_correction2 = 1 - beta2 ** float(step)
    tile = TILE if table.is_cuda else INTERPRETER_TILE
    geo = geometry(layout, tile)
    weights = pairs[0][0].params[0].data if weight_masters else None  # the others are counted from it
    for launch in launches(layout, tile):
        base = next((g[i] for g in grads for i in launch.params if g[i] is not None), None)
        meta = torch.tensor(_meta_rows(pairs, grads, launch.params, base, step, weights), dtype=torch.int64)
        if table.is_cuda:  # one small copy, ordered before the kernel on this stream
            meta = meta.pin_memory().to(table.device, non_blocking=True)
        kernels._adamw_record_kernel[(*launch.grid, len(pairs))](
            weights if weight_masters else views["master"], views.get("rest", views["master"]), views["exp_avg"],
            views["exp_avg_sq"],
            views["m_scale"] if int8 else views["exp_avg"], views["v_scale"] if int8 else views["exp_avg_sq"],
            base if base is not None else views["master"], grad_scale if grad_scale is not None else table, table,
            meta, *launch.sizes, *launch.starts, *launch.block_starts,
            lr * weight_decay, 1 - beta1, beta2, 1 - beta2, lr / bias_correction1, bias_correction2 ** 0.5, cfg.eps,
            BLOCK=geo.block, BLOCK_P2=geo.block_p2, ROWS=geo.rows, HAS_SCALE=grad_scale is not None,
            MASTER_SR=layout.master == "bf16_sr", MASTER_SPLIT=layout.master == "fp32_split", INT8=int8,
            BF16_MOMENTS=layout.moments == "bf16", LERP_FROM_M=1 - beta1 < 0.5, META=META,
            MASTER_ITEM=MASTER_DTYPE[layout.master].itemsize, MOMENT_ITEM=MOMENT_DTYPE[layout.moments].itemsize,
            WEIGHT_MASTER=weight_masters, num_warps=NUM_WARPS,
            enable_fp_fusion=False)  # no implicit mul+add contraction: the explicit fmas are the only ones
