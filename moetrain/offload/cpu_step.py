"""The CPU step path: experts stepped by the CPU share's AdamW in host memory, pipelined in chunks.

For each chunk of records (about ``chunk_numel`` parameters)::

    down_stream   wait(grads ready) ─ D2H grads (compute dtype) -> pinned grad buffer[k] ─ event
    host          wait event ─ upcast to fp32 (x clip coef) ─ CPU Adam per record (fp32 master in the
                  slab, or read from NVMe) ─ master -> compute dtype into pinned weight buffer[k]
    up_stream     H2D weight buffer[k] -> the model's packed parameter views (in place) ─ event

Two grad buffers and two weight buffers alternate (pooled, allocated once), so the D2H of chunk c+1 and
the H2D of chunk c-1 run while the host steps chunk c. Nothing here blocks the compute stream: the
caller calls :meth:`CpuStepper.fence` (the compute stream waits for the uploads) before the weights
are read again. When ``step`` returns, every gradient copy has landed, so gradients may be freed.
On a CPU-only machine streams and events collapse and the copies are plain copies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from moetrain.offload.state_format import rounding_seed
from moetrain.offload.store import ExpertRecord
from moetrain.offload.streams import event, on, side_stream


class CpuStepper:
    """Pooled pinned buffers, two copy streams and the chunk pipeline of the CPU step path.

    Args:
        cpu_adam: a :class:`~moetrain.offload.adam_cuda_order.CudaOrderCpuAdam` (or DeepSpeed's
            :class:`~moetrain.offload.adam.CpuAdam`, ``cpu_adam: deepspeed``).
        device: the compute device (its parameters and gradients live there).
        dtype: the experts' compute dtype (that of their ``.grad`` and weights).
        chunk_numel: parameters per chunk (raised to the largest record so that one always fits).
        mark_transfer: called on a copy stream right before its first copy is queued.
        write_weights: ``write_weights(rec, weights)`` takes each record's new compute weights ((n,) in host
            memory) instead of the upload into the model's parameters (paged compute weights, whose home
            is host memory: nothing goes up the link).
    """

    def __init__(self, cpu_adam, device: torch.device, dtype: torch.dtype, chunk_numel: int,
                 mark_transfer: Callable[[Optional[torch.cuda.Stream]], None] = lambda stream: None,
                 write_weights: Optional[Callable[[ExpertRecord, torch.Tensor], None]] = None) -> None:
        self.cpu_adam, self.device, self.dtype = cpu_adam, device, dtype
        self.write_weights = write_weights
        self.mark_transfer = mark_transfer  # opens the step's paging window (telemetry)
        self.chunk_numel = chunk_numel
        cuda = device.type == "cuda"
        self.down_stream = side_stream(device)
        self.up_stream = side_stream(device)
        self.grad_bufs = [torch.empty(chunk_numel, dtype=dtype, pin_memory=cuda) for _ in range(2)]
        self.weight_bufs = [torch.empty(chunk_numel, dtype=dtype, pin_memory=cuda) for _ in range(2)]
        self.grad32 = torch.empty(chunk_numel, dtype=torch.float32)  # the upcast gradients CPU Adam reads
        self.down_events = [event(device) for _ in range(2)]
        self.up_events = [event(device) for _ in range(2)]
        self.up_used = [False, False]

    def chunks(self, recs: list[ExpertRecord]) -> list[list[ExpertRecord]]:
        """Consecutive groups of records of at most ``chunk_numel`` parameters (one record at least)."""
        out: list[list[ExpertRecord]] = []
        size = 0
        for rec in recs:
            if not out or size + rec.numel > self.chunk_numel:
                out.append([])
                size = 0
            out[-1].append(rec)
            size += rec.numel
        return out

    def _down(self, chunk: list[ExpertRecord], k: int, ready: Optional[torch.cuda.Event]) -> None:
        """Gradients of ``chunk`` into grad buffer ``k`` (non_blocking on the down stream); None -> zeros."""
        buf, off = self.grad_bufs[k], 0
        with on(self.down_stream):
            if ready is not None:
                self.down_stream.wait_event(ready)
            self.mark_transfer(self.down_stream)
            for rec in chunk:
                for p in rec.params:
                    n = p.numel()
                    if p.grad is None:
                        buf[off:off + n].zero_()
                    else:
                        buf[off:off + n].copy_(p.grad.reshape(-1), non_blocking=True)
                    off += n
            if self.down_events[k] is not None:
                self.down_events[k].record(self.down_stream)

    def _up(self, chunk: list[ExpertRecord], k: int) -> None:
        """Weight buffer ``k`` into the parameters of ``chunk`` (in place, non_blocking on the up stream)."""
        buf, off = self.weight_bufs[k], 0
        with on(self.up_stream):
            self.mark_transfer(self.up_stream)
            for rec in chunk:
                for p in rec.params:
                    n = p.numel()
                    p.data.copy_(buf[off:off + n].view(p.shape), non_blocking=True)
                    off += n
            if self.up_events[k] is not None:
                self.up_events[k].record(self.up_stream)
        self.up_used[k] = True

    @torch.no_grad()
    def step(self, recs: list[ExpertRecord], steps: list[int], lr: float, *, weight_decay: float,
             coef: Optional[torch.Tensor],
             ready: Optional[torch.cuda.Event], host_state: Callable[[ExpertRecord], torch.Tensor],
             put_host_state: Callable[[ExpertRecord, torch.Tensor], None]) -> None:
        """One AdamW step of ``recs``; the new weights are uploaded behind :meth:`fence`.

        ``steps[i]`` is record i's step number after this update, taken by the caller when it queued
        the work (the caller moves ``rec.step`` on while this runs in another thread).

        ``ready`` is recorded on the compute stream after the gradients were produced; ``coef`` (host,
        fp32) multiplies them first (global-norm clipping); ``host_state(rec)`` gives the record's flat
        fp32 state in host memory and ``put_host_state`` writes it back to its tier.
        """
        chunks = self.chunks(recs)
        step_of = {rec.key: step for rec, step in zip(recs, steps, strict=True)}
        for c in range(min(2, len(chunks))):
            self._down(chunks[c], c, ready)
        for c, chunk in enumerate(chunks):
            k = c % 2
            if self.down_events[k] is not None:
                self.down_events[k].synchronize()
            n = sum(r.numel for r in chunk)
            grads = self.grad32[:n]
            grads.copy_(self.grad_bufs[k][:n])
            if c + 2 < len(chunks):
                self._down(chunks[c + 2], k, ready)  # buffer k is free again: fetch the chunk after next
            if coef is not None:
                grads.mul_(coef)
            if self.up_used[k] and self.up_events[k] is not None:
                self.up_events[k].synchronize()  # weight buffer k's previous H2D has left
            wbuf, off = self.weight_bufs[k], 0
            for rec in chunk:
                flat = host_state(rec)
                master, exp_avg, exp_avg_sq = rec.parts(flat)
                step = step_of[rec.key]
                self.cpu_adam.step(master, grads[off:off + rec.numel], exp_avg, exp_avg_sq, step=step, lr=lr,
                                   weight_decay=weight_decay)
                # compressed formats: back into the record's format (nothing to do for fp32 state)
                gen = rec.codec.record_generator(master.device, rounding_seed(rec.layer, rec.expert, step))
                rec.codec.encode(flat, master=master, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, generator=gen)
                if self.write_weights is not None:
                    self.write_weights(rec, rec.codec.compute_weights(flat, master))
                else:
                    wbuf[off:off + rec.numel].copy_(rec.codec.compute_weights(flat, master))
                put_host_state(rec, flat)
                off += rec.numel
            if self.write_weights is None:
                self._up(chunk, k)

    def transfer_streams(self) -> list[torch.cuda.Stream]:
        return [s for s in (self.down_stream, self.up_stream) if s is not None]

    def fence(self) -> None:
        """The current (compute) stream waits for every weight upload issued so far (no host sync)."""
        if self.up_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.up_stream)


class CpuShare:
    """The CPU share of each layer's experts: stepped by a :class:`CpuStepper` on the records' host state, in a
    thread beside the GPU share when ``pool`` is given (CUDA: the GPU share's launches are asynchronous).

    Args:
        stepper: the chunk pipeline.
        host: reads and writes the records' state in their tier (its own NVMe channel).
        weight_decay: AdamW's decoupled weight decay.
        pool: one worker thread, or None to step in the caller's thread.
    """

    def __init__(self, stepper: CpuStepper, host, *, weight_decay: float, pool=None) -> None:
        self.stepper, self.host, self.weight_decay, self.pool = stepper, host, weight_decay, pool
        self.pending: list = []

    def submit(self, recs: list[ExpertRecord], lr: float, clip_coef: Optional[torch.Tensor]) -> None:
        """Queue one AdamW step of ``recs`` (already settled in their tier) after the compute stream's work so far:
        their step numbers are read now (``rec.step`` moves on while the thread runs)."""
        ready = event(self.stepper.device)  # the gradient copies wait for the compute stream
        if ready is not None:
            ready.record()
        args = (recs, [r.step + 1 for r in recs], lr, ready, clip_coef)
        if self.pool is not None:
            self.pending.append(self.pool.submit(self._step, *args))
        else:
            self._step(*args)

    def _step(self, recs: list[ExpertRecord], steps: list[int], lr: float, ready: Optional[torch.cuda.Event],
              clip_coef: Optional[torch.Tensor]) -> None:
        coef = None if clip_coef is None else clip_coef.cpu()
        self.stepper.step(recs, steps, lr, weight_decay=self.weight_decay, coef=coef, ready=ready,
                          host_state=self.host.read, put_host_state=self.host.write)

    def finish(self) -> None:
        """Wait for the thread; the compute stream then waits for its weight uploads (no host sync)."""
        for pending in self.pending:
            pending.result()
        self.pending.clear()
        self.stepper.fence()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
