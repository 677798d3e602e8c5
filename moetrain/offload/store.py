"""Expert records and the tiers that hold them.

Every routed expert of every MoE layer is one :class:`ExpertRecord`. Its optimizer state is one flat buffer (float32
elements, padded to :data:`~moetrain.offload.nvme.ALIGN` bytes) laid out by its
:class:`~moetrain.offload.state_format.StateLayout`: fp32 ``[master | exp_avg | exp_avg_sq]`` (3 n floats, n = the
expert's parameter count) or a compressed layout (``model.offload.state.master`` / ``moments``), so that paging a record
is one large transfer (one ``copy_`` or one aio request). Inside each part the expert's parameters follow in a fixed
order (gate_proj, up_proj, down_proj): a part splits into views shaped like the parameters without copying.

Tiers:

* ``Tier.CPU``: a slice of a host slab, records in layer order until ``cpu_budget_gb`` is used up. The slab is cut
  into pieces of a power-of-two capacity (1 GiB or more) that records fill without straddling two: the pinned
  allocator rounds every allocation up to a power of two, and pieces pin in parallel. Where the compute weights
  are the only master (:func:`~moetrain.offload.master_segment.host_drops_masters`: ``bf16_sr`` or ``fp32_split``,
  resident weights, ``step_on: gpu``) a host record holds what follows its master segment only (``host_skip``).
* ``Tier.NVME``: an aligned slice of one preallocated swap file (records past the CPU budget, or every record under
  ``tier: nvme``), always whole.

The compute weights stay the model's own expert parameters; the store holds master weights and moments. Only experts
whose parameters require a gradient get a record: a frozen expert (:mod:`moetrain.models.train_selection`) has no state
and is never paged or stepped; the store only remembers where its weights are (``frozen``), so that checkpoints and
loads still see the whole model (:mod:`moetrain.offload.frozen`). The device-side slots are owned by
:class:`~moetrain.offload.swapper.Swapper`.

Filling the store at start-up (DeepSeek-MoE-16B: 1,728 records, 56 GiB under ``bf16_sr``/``int8``)::

    pin the slab   power-of-two pieces, each an anonymous mapping marked MADV_DONTFORK (a forked DataLoader worker
                   copies none of it) and page-locked by cudaHostRegister from a thread pool: 6-11 GiB/s on an H200
                   host against cudaHostAlloc's 1.6-1.9 (:mod:`moetrain.offload.pinned`, which falls back to it)
    encode         where the weights are: on the GPU, a chunk of consecutive records (<= 256 MiB) at a time into one
                   device buffer (master rounded, zero moments)
    copy out       one device-to-host copy per chunk into its piece of the slab (or into a pinned staging buffer
                   that becomes one NVMe write); on a CPU records encode in place

with a progress line on stderr for stores of 1 GiB or more (:mod:`moetrain.offload.fill_progress`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from typing import Optional

import torch
import torch.nn as nn

from moetrain.offload.config import OffloadPlan
from moetrain.offload.fill_progress import FillProgress
from moetrain.offload.frozen import FrozenExpert, trains
from moetrain.offload.master_segment import copy_masters, host_drops_masters, master_floats
from moetrain.offload.nvme import ALIGN, SwapFile, align_up, aligned_empty, open_swap
from moetrain.offload.pinned import pin_pieces
from moetrain.offload.record import ExpertRecord, Tier
from moetrain.offload.state_format import StateCodec, StateLayout

STATE_PARTS = ("master", "exp_avg", "exp_avg_sq")

PIECE_MIN_BYTES = 1 << 30
PIECE_MIN_RECORDS = 32
"""A host-slab piece holds at least this many bytes and records (see :meth:`ExpertStore.piece_capacity`)."""

FILL_CHUNK_BYTES = 256 << 20
"""Bytes of records encoded on the GPU per device-to-host copy when the store fills (and of an NVMe staging
buffer, pinned allocation included: a power of two)."""

PROGRESS_MIN_BYTES = 1 << 30
"""Stores of this much state or more report their filling on stderr (``progress=None``)."""


class ExpertStore:
    """All expert records, their host slab and their swap file.

    Args:
        model: a :class:`~moetrain.models.decoder.MoEForCausalLM`.
        cfg: the offload config (tier, budgets, nvme settings).
        pin: pin the host slab (True when CUDA is the compute device).
        owns: ``owns(layer, expert)``: keep only these records (a data-parallel rank's share, see
            :mod:`moetrain.parallel`); None keeps all. ``num_experts`` still counts every expert of a layer.
            Experts whose parameters do not require a gradient get no record either (``frozen``).
        initialise: take the master weights from the model's expert parameters now. False: the masters
            arrive through :meth:`write_master` (a checkpoint streamed straight into the tiers, see
            :mod:`moetrain.offload.staged_init`), and :meth:`finish_staged` closes the stream.
        progress: report the filling on stderr (:class:`~moetrain.offload.fill_progress.FillProgress`); None:
            for stores of :data:`PROGRESS_MIN_BYTES` or more.
    """

    def __init__(self, model: nn.Module, cfg: OffloadPlan, pin: bool = False,
                 owns: Optional[Callable[[int, int], bool]] = None, initialise: bool = True,
                 progress: Optional[bool] = None) -> None:
        self.cfg = cfg
        self.pin = pin
        names = {id(p): n for n, p in model.named_parameters()}
        self.records: dict[tuple[int, int], ExpertRecord] = {}
        self.frozen: dict[tuple[int, int], FrozenExpert] = {}  # this rank's experts that do not train: no state
        self.layers: list[int] = []
        for block in model.moe_blocks():
            self.layers.append(block.layer_idx)
            for e, expert in enumerate(block.experts):
                if owns is not None and not owns(block.layer_idx, e):
                    continue  # another rank's share (or an expert that lives on another rank)
                params = [expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight]
                full = [names[id(p)] for p in params]
                if not trains(params, full[0]):
                    self.frozen[(block.layer_idx, e)] = FrozenExpert(
                        layer=block.layer_idx, expert=e, prefix=full[0].rsplit(".", 2)[0], params=params, names=full,
                        shapes=[p.shape for p in params])
                    continue
                numel = sum(p.numel() for p in params)
                layout = StateLayout(tuple(p.numel() for p in params), cfg.master, cfg.moments, cfg.quant_block)
                rec = ExpertRecord(layer=block.layer_idx, expert=e, prefix=full[0].rsplit(".", 2)[0], params=params,
                                   names=full, numel=numel, padded=align_up(layout.nbytes) // 4,
                                   shapes=[p.shape for p in params], layout=layout, codec=StateCodec(layout))
                self.records[rec.key] = rec
        self.num_experts = {block.layer_idx: len(block.experts) for block in model.moe_blocks()}
        self.drops_masters = host_drops_masters(cfg.master, cfg.resident_weights, cfg.step_on)
        self.pager = None  # the experts' paged compute weights, when staged init built them (resident_weights: no)
        self.by_name = {name: (rec, i) for rec in self.records.values() for i, name in enumerate(rec.names)}
        self.frozen_by_name = {name: (fx, i) for fx in self.frozen.values() for i, name in enumerate(fx.names)}
        self._place()
        self.report = progress if progress is not None else self.cpu_bytes + self.nvme_bytes >= PROGRESS_MIN_BYTES
        self._progress: Optional[FillProgress] = None
        self.pin_seconds = 0.0
        self._allocate()
        self._staged: dict[tuple[int, int], tuple[torch.Tensor, set[int]]] = {}  # record -> (buffer, parts written)
        if initialise:
            try:
                self._initialise()
            except BaseException:  # no one gets this store to close: delete its swap file now (Ctrl-C included)
                self.close()
                raise

    # ------------------------------------------------------------------ placement
    def piece_capacity(self) -> int:
        """Bytes a host-slab piece may hold: a power of two (what the pinned allocator gives anyway), at least
        :data:`PIECE_MIN_BYTES` and 32 records, so that the room a full piece leaves is under 1/32 of it."""
        return 1 << (max(PIECE_MIN_BYTES, PIECE_MIN_RECORDS * self.max_padded * 4) - 1).bit_length()

    def _place(self) -> None:
        """Records in layer order fill the CPU budget, the rest go to NVMe (all of them under tier nvme); host
        records fill slab pieces in order, a record that does not fit the current piece starting the next. Where
        the compute weights are the only master (:func:`~moetrain.offload.master_segment.host_drops_masters`) a
        host record takes what follows its master segment only."""
        budget = None if self.cfg.cpu_budget_gb is None else int(self.cfg.cpu_budget_gb * 2**30)
        capacity = self.piece_capacity()
        cpu_used = nvme_used = 0
        self.piece_bytes: list[int] = []
        for rec in self.records.values():
            skip = master_floats(rec.layout) if self.drops_masters else 0
            host_bytes = (rec.padded - skip) * 4
            fits = self.cfg.tier == "cpu" and (budget is None or cpu_used + host_bytes <= budget)
            if fits:
                if not self.piece_bytes or self.piece_bytes[-1] + host_bytes > capacity:
                    self.piece_bytes.append(0)
                rec.tier, rec.piece, rec.offset, rec.host_skip = Tier.CPU, len(self.piece_bytes) - 1, \
                    self.piece_bytes[-1] // 4, skip
                self.piece_bytes[-1] += host_bytes
                cpu_used += host_bytes
            else:
                rec.tier, rec.offset, rec.host_skip = Tier.NVME, nvme_used, 0
                nvme_used += rec.state_bytes
        self.cpu_bytes, self.nvme_bytes = cpu_used, nvme_used

    def _allocate(self) -> None:
        """The slab pieces (pinned by cudaHostAlloc from a thread pool when ``pin``) and the swap file."""
        if self.report and self.pin and self.cpu_bytes:
            print(f"expert store: pinning {self.cpu_bytes / 2**30:.2f} GiB of host memory "
                  f"({len(self.piece_bytes)} pieces)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        # pieces pinned by cudaHostRegister are unlocked by close()
        self.slabs, self.registered = pin_pieces(self.piece_bytes, pin=self.pin)
        self.pin_seconds = time.perf_counter() - start if self.pin else 0.0
        c = self.cfg
        self.swap: Optional[SwapFile] = open_swap(c.nvme_path, self.nvme_bytes, backend=c.nvme_backend,
                                                  block_size=c.nvme_block_size, queue_depth=c.nvme_queue_depth,
                                                  threads=c.nvme_threads)

    def _start_progress(self, what: str) -> Optional[FillProgress]:
        if not self.report:
            return None
        where = [f"{self.cpu_bytes / 2**30:.2f} GiB {'pinned ' if self.pin else ''}host memory"] * bool(self.cpu_bytes)
        where += [f"{self.nvme_bytes / 2**30:.2f} GiB on NVMe"] * bool(self.nvme_bytes)
        progress = FillProgress(len(self.records), self.cpu_bytes + self.nvme_bytes,
                                f"{what} {len(self.records)} records, {(self.cpu_bytes + self.nvme_bytes) / 2**30:.2f} "
                                f"GiB ({', '.join(where)})")
        if self.pin_seconds:
            progress.extra = f" (pinning {self.pin_seconds:.1f} s before)"
        return progress

    def _runs(self, chunk: int) -> Iterator[list[tuple[ExpertRecord, int]]]:
        """Consecutive records of one tier stored contiguously (one slab piece, or adjacent in the swap file), at most
        ``chunk`` floats of whole records (or one record): ``[(record, its float offset in the run)]``."""
        run: list[tuple[ExpertRecord, int]] = []
        size = 0
        for rec in self.records.values():
            if run:
                last = run[-1][0]
                adjacent = (rec.tier is last.tier and size + rec.padded <= chunk
                            and (rec.piece == last.piece and rec.offset == last.offset + last.host_floats
                                 if rec.tier is Tier.CPU else rec.offset == last.offset + last.state_bytes))
                if not adjacent:
                    yield run
                    run, size = [], 0
            run.append((rec, size))
            size += rec.padded
        if run:
            yield run

    @torch.no_grad()
    def _initialise(self) -> None:
        """master = the weights in fp32 (rounded to nearest if bf16), moments = 0, encoded where the weights are: a
        chunk of records at a time in one buffer, then one copy into the slab (or a staging buffer that one NVMe
        write takes). A compressed master becomes the compute weights (used from the first step on)."""
        if not self.records:
            return
        device = next(iter(self.records.values())).params[0].device
        on_host = device.type == "cpu"
        total = sum(rec.padded for rec in self.records.values())
        chunk = max(min((FILL_CHUNK_BYTES - ALIGN) // 4, total), self.max_padded)  # + aligned_empty's pad: 2^k bytes
        # a host record without its master is shorter than what encodes it: on a CPU it encodes in a work buffer too
        in_place = on_host and not any(rec.host_skip for rec in self.records.values())
        work = None if in_place else torch.empty(chunk, dtype=torch.float32, device=device)
        staging: list[torch.Tensor] = []  # two host buffers for NVMe runs: one is written while the other fills
        nvme_runs = 0
        progress = self._start_progress("filling")
        try:
            for run in self._runs(chunk):
                first = run[0][0]
                n = sum(rec.padded for rec, _ in run)
                if first.tier is Tier.CPU:
                    dest = self.slabs[first.piece][first.offset:first.offset + sum(r.host_floats for r, _ in run)]
                else:
                    turn, nvme_runs = nvme_runs % 2, nvme_runs + 1
                    if len(staging) == turn:
                        staging.append(aligned_empty(chunk, self.pin))
                    dest = staging[turn][:n]
                buf = dest if work is None else work[:n]
                for rec, at in run:
                    flat = buf[at:at + rec.padded]
                    rec.codec.encode_initial(flat, [p.detach() for p in rec.params])
                    self._use_stored_master(rec, flat)
                if any(rec.host_skip for rec, _ in run):  # the masters stay in the weights: the rest, packed
                    buf = torch.cat([buf[at + rec.host_skip:at + rec.padded] for rec, at in run])
                if buf is not dest:
                    dest.copy_(buf)  # one device-to-host copy; it ends before the buffer is encoded into again
                if first.tier is Tier.NVME:
                    self.swap.wait_writes()  # the other staging buffer's write: that buffer fills next
                    self.swap.submit_write(dest, first.offset)
                if progress is not None:
                    progress.update(len(run), n * 4)
            if self.swap is not None:
                self.swap.wait_writes()
        except BaseException:
            if progress is not None:
                progress.close(complete=False)
            raise
        if progress is not None:
            progress.close()

    @staticmethod
    def _use_stored_master(rec: ExpertRecord, flat: torch.Tensor) -> None:
        """Under a compressed master the compute weights take the stored (rounded) value, so that compute and a
        checkpoint see the same weights from the first step on."""
        if rec.layout.master == "fp32":
            return
        for p, (elems, _) in zip(rec.params, rec.codec.param_slices(), strict=True):
            p.data.copy_(rec.codec.compute_part(flat, elems).view(p.shape))

    # ------------------------------------------------------------------ masters streamed in
    @torch.no_grad()
    def write_master(self, name: str, weight: torch.Tensor) -> None:
        """Store one expert parameter's master weight (any dtype/device) straight into its record. A record's moments
        and padding are zeroed when its first part arrives. Host-tier records are written in place; an NVMe record
        (or a host record without its master) is assembled in a buffer and written once its last part arrived."""
        if name in self.frozen_by_name:  # a frozen expert: its compute weight only
            fx, idx = self.frozen_by_name[name]
            fx.write(idx, weight, self.pager)
            return
        rec, idx = self.by_name[name]
        if self._progress is None and self.report:
            self._progress = self._start_progress("loading masters into")
        buf, done = self._staged.get(rec.key, (None, set()))
        if buf is None:  # a host record is written in place, unless its master goes to the weights only
            if weight.device.type != "cpu":  # a random initialisation drawn on the GPU: assembled there, copied once
                buf = torch.empty(rec.padded, dtype=torch.float32, device=weight.device)
            elif rec.tier is Tier.CPU and not rec.host_skip:
                buf = self.host_view(rec)
            else:
                buf = aligned_empty(rec.padded, self.pin and rec.tier is Tier.NVME)
            rec.codec.clear_state(buf)
        elems, _ = rec.codec.param_slices()[idx]
        rec.codec.encode_master_part(buf, elems, weight)
        done.add(idx)
        if len(done) < len(rec.params):
            self._staged[rec.key] = (buf, done)
            return
        self._staged.pop(rec.key, None)
        if self.pager is not None:  # paged compute weights (a resume into staged tiers): from the stored master
            self.pager.write(rec.layer, rec.expert, rec.codec.compute_weights(buf, rec.codec.decode_master(buf)))
        else:  # compute from the stored (rounded) master, as _initialise does
            self._use_stored_master(rec, buf)
        if rec.tier is Tier.NVME:
            self.swap.submit_write(buf if buf.is_cpu else aligned_empty(rec.padded, self.pin).copy_(buf), rec.offset)
            self.swap.wait_writes()
        elif rec.host_skip or not buf.is_cpu:
            self.host_tail(rec, rec.host_skip).copy_(buf[rec.host_skip:])
        if self._progress is not None:
            self._progress.update(1, rec.state_bytes)

    def finish_staged(self) -> None:
        """Every record must have received all its parts (the loader reports missing tensors first)."""
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.close(complete=not self._staged)
        if self._staged:
            names = [self.records[k].prefix for k in list(self._staged)[:3]]
            raise RuntimeError(f"expert master weights incomplete for {len(self._staged)} expert(s): {names}")

    @torch.no_grad()
    def master_weights(self, rec: ExpertRecord) -> list[torch.Tensor]:
        """The record's master weights as fp32 tensors shaped like its parameters (host copies)."""
        flat = self._read_record(rec) if rec.tier is Tier.NVME else self.whole_state(rec)
        return [w.clone() for w in rec.split(rec.codec.decode_master(flat))]

    def _read_record(self, rec: ExpertRecord) -> torch.Tensor:
        buf = aligned_empty(rec.padded, self.pin)
        self.swap.submit_read(buf, rec.offset)
        self.swap.wait_reads()
        return buf

    # ------------------------------------------------------------------ access
    def host_view(self, rec: ExpertRecord) -> torch.Tensor:
        """The (padded,) host slab slice of a CPU-tier record that holds its whole state (``host_skip`` 0)."""
        assert rec.tier is Tier.CPU and not rec.host_skip, f"{rec.prefix}: its master is in the weights only"
        return self.slabs[rec.piece][rec.offset:rec.offset + rec.padded]

    @torch.no_grad()
    def whole_state(self, rec: ExpertRecord, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A host-tier record's whole (padded,) flat state in host memory: its slab slice, or for a record without
        its master (``host_skip``) ``out`` (a new buffer when None) holding the compute weights in the master
        segment and the slab's rest after it (writing into that changes nothing stored)."""
        if not rec.host_skip:
            return self.host_view(rec)
        flat = aligned_empty(rec.padded, False) if out is None else out[:rec.padded]
        flat[:rec.host_skip].zero_()  # the master segment's alignment padding
        copy_masters([rec], [flat])  # from the device, after the work queued on the current stream
        flat[rec.host_skip:].copy_(self.host_tail(rec, rec.host_skip))
        return flat

    def host_tail(self, rec: ExpertRecord, start: int) -> torch.Tensor:
        """Floats ``start:padded`` of a CPU-tier record's flat state, in the slab (``start`` >= ``host_skip``)."""
        assert rec.tier is Tier.CPU and start >= rec.host_skip, f"{rec.prefix}: {start} < host_skip {rec.host_skip}"
        at = rec.offset + start - rec.host_skip
        return self.slabs[rec.piece][at:at + rec.padded - start]

    def layer_records(self, layer: int) -> list[ExpertRecord]:
        return [self.records[(layer, e)] for e in range(self.num_experts[layer]) if (layer, e) in self.records]

    def __iter__(self) -> Iterator[ExpertRecord]:
        return iter(self.records.values())

    @property
    def max_padded(self) -> int:
        return max((r.padded for r in self.records.values()), default=ALIGN // 4)

    @property
    def nvme_backend(self) -> Optional[str]:
        return None if self.swap is None else self.swap.backend

    def close(self) -> None:
        """Delete the swap file and unlock registered host pieces (idempotent); the host slab goes with the last
        reference to the store."""
        for piece in getattr(self, "registered", []):
            piece.unregister()
        swap, self.swap = self.swap, None
        if swap is not None:
            swap.close()
