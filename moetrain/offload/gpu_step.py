"""The GPU step path: routed experts' state paged into device slots, stepped by the fused AdamW kernel there.

For each chunk of a third of the slots (the next third fills meanwhile, the last one empties)::

    acquire(chunk)          hits, or H2D on the swapper's in_stream; compute waits on per-slot events
    prefetch(next chunk)    ← overlaps the fused step below
    compressed, CUDA        one Triton kernel launch for the chunk's records (moetrain.offload.fused_step): decode,
                            AdamW and encode in registers, in place in the slots; then the new compute weights
    otherwise:
      decode (compressed)   fp32 scratch, groups of at most a quarter of gpu_budget_gb
      _fused_adamw_         gradients scaled in-kernel by 1 / clip coefficient
      encode, new weights   the record's format; compute weights written by the WeightWriter
    release(chunk)          D2H on out_stream after an event ← under the next chunk, and the next forward

The unfused path (decode, torch's fused AdamW, encode) stays for the fp32 format, the CPU, formats the kernel does
not take (``bf16_kahan``), a machine without triton, and ``MOETRAIN_FUSED_STEP=0`` (benchmarks and tests compare
the two). Under ``bf16_sr`` the two paths draw different stochastic-rounding bits (see ``fused_step``).
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch.profiler import record_function

from moetrain.offload.adam import adamw
from moetrain.offload.compute_weights import WeightWriter
from moetrain.offload.fused_step import fused_step_available, fused_step_many_
from moetrain.offload.state_format import rounding_seed
from moetrain.offload.store import ExpertRecord
from moetrain.offload.swapper import Swapper
from moetrain.optim import OptimizerConfig

CHUNKS_ENV = "MOETRAIN_STEP_CHUNKS"
"""Into how many chunks the slots are cut (default 3, see :meth:`GpuStep.chunks`)."""

CHUNK_RANGE = "moetrain.expert_chunk"
"""The ``record_function`` range of one chunk's acquire, step and release (host time in a trace)."""


class GpuStep:
    """Steps records in device slots.

    Args:
        swapper: the device slots and their streams.
        cfg: AdamW hyperparameters.
        writer: where new compute weights go.
        compressed: the store's format is compressed (stepped by the fused kernel on CUDA, else decoded into fp32
            scratch, then encoded back).
        scratch_bytes: the most fp32 scratch one unfused call may decode into (compressed formats only).
    """

    def __init__(self, swapper: Swapper, cfg: OptimizerConfig, writer: WeightWriter, *, compressed: bool,
                 scratch_bytes: float) -> None:
        self.swapper, self.cfg, self.writer = swapper, cfg, writer
        self.compressed, self.scratch_bytes = compressed, scratch_bytes
        self.fused_state: Optional[str] = None  # None: not tried yet; "ok"; "off": its first call failed

    @property
    def weight_masters(self) -> bool:
        """The kernel reads and writes the master in the compute weights (:meth:`Swapper.use_weight_masters`)."""
        return self.swapper.weight_masters

    def chunks(self, recs: list[ExpertRecord]) -> list[list[ExpertRecord]]:
        """Consecutive groups of a third of the slots: one stepped, one filling, one emptying, so that a page-in need
        not wait for the page-out of the chunk just released (``MOETRAIN_STEP_CHUNKS=2`` takes halves: one stepped
        while the other fills, its page-ins behind the page-outs of the same slots). Measured on DeepSeek-MoE-16B
        (``bf16_sr`` + int8): in r21 and r22 thirds cut the step after backward (0.66-0.71 -> 0.59-0.64 s) but the
        fused kernel then took half of it and the host more, and the fit did not improve (8.97 s against 7.26 s).
        With the kernel 2.4 times faster (r33), the 28-layer harness's traced step showed halves leaving each
        direction of the link idle 40% of the time behind those waits; thirds took it from 0.73 to 0.55 s (r34),
        and the fit's step after backward from 0.47-0.53 to 0.37-0.47 s (r35): the default since."""
        size = max(1, self.swapper.num_slots // int(os.environ.get(CHUNKS_ENV, "3")))
        return [recs[i:i + size] for i in range(0, len(recs), size)]

    def step(self, recs: list[ExpertRecord], lr: float, clip_coef: Optional[torch.Tensor] = None,
             *, grad_scale: Optional[torch.Tensor] = None) -> None:
        """One AdamW step of ``recs`` (their ``.grad``, None read as zero) at ``lr``; ``rec.step`` is left to
        the caller. ``clip_coef``/``grad_scale``: device scalars of global-norm clipping, applied in-kernel."""
        chunks = self.chunks(recs)
        for c, chunk in enumerate(chunks):
            with record_function(CHUNK_RANGE):  # a traced step's host rows show each chunk's acquire, step, release
                flats = self.swapper.acquire(chunk)
                if c + 1 < len(chunks):
                    self.swapper.prefetch(chunks[c + 1])
                fused, rest = [], []
                for pair in zip(chunk, flats, strict=True):
                    (fused if self.fuses(*pair) else rest).append(pair)
                rest += self.step_fused(fused, lr, grad_scale=grad_scale)
                self.step_unfused(rest, lr, clip_coef=clip_coef, grad_scale=grad_scale)
                self.swapper.release(chunk)

    def fuses(self, rec: ExpertRecord, flat: torch.Tensor) -> bool:
        """``rec`` in ``flat`` is stepped by the fused kernel (compressed, on CUDA, a format it takes)."""
        return (self.compressed and self.fused_state != "off" and rec.layout is not None
                and fused_step_available(rec.layout, flat.device))

    def step_fused(self, pairs: list[tuple[ExpertRecord, torch.Tensor]], lr: float, *,
                   grad_scale: Optional[torch.Tensor]) -> list[tuple[ExpertRecord, torch.Tensor]]:
        """Step the (record, its slot) pairs with the fused kernel in place, several records a launch
        (:func:`~moetrain.offload.fused_step.fused_step_many_`), then write their compute weights: the stored master
        itself (fp32, or the bf16 that stochastic rounding or the split stored), as :meth:`store_stepped` does.

        Returns the pairs left for the unfused path: all of them when the kernel's first call fails (a Triton that
        cannot compile it), which turns the fused path off for the run with one warning. Compilation fails before
        the first launch, so nothing was written; later failures propagate."""
        if not pairs:
            return []
        try:
            masters = fused_step_many_(pairs, steps=[rec.step + 1 for rec, _ in pairs], lr=lr,
                                       weight_decay=self.cfg.weight_decay, cfg=self.cfg, grad_scale=grad_scale,
                                       weight_masters=self.weight_masters)
        except Exception as err:  # noqa: BLE001  (Triton's compile errors have no common base class)
            if self.fused_state is not None:
                raise
            self.fused_state = "off"
            warnings.warn(f"the fused expert step failed to run ({type(err).__name__}: {err}); stepping the "
                          "compressed state with the unfused path instead", RuntimeWarning, stacklevel=2)
            return pairs
        self.fused_state = "ok"
        if not self.weight_masters:  # else the kernel wrote the new master into the weights themselves
            self.writer.write_many([(rec, rec.codec.compute_weights(flat, master))
                                    for (rec, flat), master in zip(pairs, masters, strict=True)])
        return []

    def step_unfused(self, pairs: list[tuple[ExpertRecord, torch.Tensor]], lr: float, *,
                     clip_coef: Optional[torch.Tensor], grad_scale: Optional[torch.Tensor]) -> None:
        """Step (record, its slot) pairs with torch's fused AdamW over fp32 state: in place under the fp32
        format, else decoded into fp32 scratch and encoded back."""
        if pairs and self.weight_masters:  # the slots' master segments are not kept then
            raise RuntimeError("the unfused expert step cannot run once the masters are read from the weights")
        for group in self._scratch_groups(pairs):
            ps, gs, ms, vs, steps, decoded = [], [], [], [], [], []
            for rec, flat in group:
                master, exp_avg, exp_avg_sq = rec.parts(flat)
                decoded.append((rec, flat, master, exp_avg, exp_avg_sq))
                views = zip(rec.params, rec.split(master), rec.split(exp_avg), rec.split(exp_avg_sq), strict=True)
                for p, w, m, v in views:
                    ps.append(w)
                    gs.append(p.grad if p.grad is not None else torch.zeros_like(p))
                    ms.append(m)
                    vs.append(v)
                    steps.append(rec.step + 1)
            adamw(ps, gs, ms, vs, steps=steps, lr=lr, weight_decay=self.cfg.weight_decay, cfg=self.cfg,
                  clip_coef=clip_coef,
                  grad_scale=grad_scale)
            for rec, flat, master, exp_avg, exp_avg_sq in decoded:
                self.store_stepped(rec, flat, master=master, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                                   step=rec.step + 1)

    def _scratch_groups(self, pairs: list[tuple[ExpertRecord, torch.Tensor]]) -> list[list]:
        """Records stepped by one fused call. fp32 state is stepped in place in its slots: the whole
        chunk at once. Compressed state is decoded into fp32 scratch (12 bytes a parameter) and encoded
        back: groups whose scratch stays within ``scratch_bytes`` (at least one record)."""
        if not pairs:
            return []
        if not self.compressed:
            return [pairs]
        groups: list[list] = []
        size = 0.0
        for pair in pairs:
            scratch = 12.0 * pair[0].numel
            if not groups or size + scratch > self.scratch_bytes:
                groups.append([])
                size = 0.0
            groups[-1].append(pair)
            size += scratch
        return groups

    def store_stepped(self, rec: ExpertRecord, flat: torch.Tensor, *, master: torch.Tensor, exp_avg: torch.Tensor,
                      exp_avg_sq: torch.Tensor, step: int) -> None:
        """Encode a stepped record's fp32 state into its format (nothing to do for fp32) and write the new
        compute weights (``step``: the record's AdamW step number after this update)."""
        generator = rec.codec.record_generator(flat.device, rounding_seed(rec.layer, rec.expert, step))
        rec.codec.encode(flat, master=master, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, generator=generator)
        self.writer.write(rec, rec.codec.compute_weights(flat, master))
