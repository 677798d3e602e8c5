"""Expert records and the tiers that hold them.

Every routed expert of every MoE layer is one :class:`ExpertRecord`. Its optimizer state is one flat
buffer (float32 elements, padded to :data:`~moetrain.offload.nvme.ALIGN` bytes) laid out by its
:class:`~moetrain.offload.state_format.StateLayout`: by default fp32 ``[master | exp_avg | exp_avg_sq]``
(3 * n floats, n = the expert's parameter count), or a compressed layout (bf16 master, bf16 or 8-bit
moments: ``model.offload.master`` / ``moments``), so that paging a record in or out is a single large
transfer (one ``copy_`` or one aio request), never 9 small ones. Inside each part the expert's
parameters follow in a fixed order (gate_proj, up_proj, down_proj), so a part splits into views
shaped like the parameters without copying.

Tiers:

* ``Tier.CPU``: a slice of one host slab (``torch.empty(..., pin_memory=True)`` when CUDA exists; plain
  memory on a CPU-only machine, where nothing can be pinned). Records are placed in layer order until
  ``cpu_budget_gb`` is used up.
* ``Tier.NVME``: an aligned slice of one preallocated swap file (records past the CPU budget, or every
  record under ``tier: nvme``).

The compute weights stay the model's own expert parameters (resident on the device); the store holds
master weights and moments. The device-side slots are owned by :class:`~moetrain.offload.swapper.Swapper`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from moetrain.offload.config import OffloadConfig
from moetrain.offload.nvme import ALIGN, SwapFile, align_up, aligned_empty, open_swap
from moetrain.offload.state_format import StateCodec, StateLayout

STATE_PARTS = ("master", "exp_avg", "exp_avg_sq")


class Tier(enum.Enum):
    """Where a record's master weights and moments live between steps."""

    CPU = "cpu"
    NVME = "nvme"


@dataclass
class ExpertRecord:
    """One routed expert's optimizer state.

    Attributes:
        layer: decoder layer index; expert: expert index in the layer.
        prefix: parameter name prefix, e.g. ``model.layers.1.mlp.experts.3``.
        params: the model's compute-weight parameters, in layout order.
        names: their full names (``prefix + ".gate_proj.weight"``, ...).
        numel: n, parameters of the expert; ``padded``: floats of the flat state buffer (>= 3n).
        tier: where the state lives; ``offset``: float offset in the CPU slab or byte offset in the swap file.
        step: AdamW steps applied to this expert (torch's per-parameter ``state["step"]``).
        synced_to: optimizer steps reflected in the state (``idle_experts: dense`` catches up to the current one).
        frequency: decayed count of tokens routed to it (the cache's eviction key).
    """

    layer: int
    expert: int
    prefix: str
    params: list[nn.Parameter]
    names: list[str]
    numel: int
    padded: int
    tier: Tier = Tier.CPU
    offset: int = 0
    step: int = 0
    synced_to: int = 0
    frequency: float = 0.0
    shapes: list[torch.Size] = field(default_factory=list)
    layout: Optional[StateLayout] = None
    codec: Optional[StateCodec] = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.expert)

    @property
    def state_bytes(self) -> int:
        return self.padded * 4

    def parts(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(master, exp_avg, exp_avg_sq), each (n,) fp32: views of the flat state buffer under the fp32
        layout, decoded copies under a compressed one (write them back with ``codec.encode``)."""
        if self.codec is None:
            n = self.numel
            return flat[:n], flat[n:2 * n], flat[2 * n:3 * n]
        return self.codec.decode(flat)

    def split(self, part: torch.Tensor) -> list[torch.Tensor]:
        """Views of an (n,) part shaped like the expert's parameters."""
        out, start = [], 0
        for shape in self.shapes:
            size = shape.numel()
            out.append(part[start:start + size].view(shape))
            start += size
        return out


class ExpertStore:
    """All expert records, their host slab and their swap file.

    Args:
        model: a :class:`~moetrain.models.decoder.MoEForCausalLM`.
        cfg: the offload config (tier, budgets, nvme settings).
        pin: pin the host slab (True when CUDA is the compute device).
        owns: ``owns(layer, expert)``: keep only these records (a data-parallel rank's share, see
            :mod:`moetrain.parallel`); None keeps all. ``num_experts`` still counts every expert of a layer.
        initialise: take the master weights from the model's expert parameters now. False: the masters
            arrive through :meth:`write_master` (a checkpoint streamed straight into the tiers, see
            :mod:`moetrain.offload.staged_init`), and :meth:`finish_staged` closes the stream.
    """

    def __init__(self, model: nn.Module, cfg: OffloadConfig, pin: bool = False,
                 owns: Optional[Callable[[int, int], bool]] = None, initialise: bool = True) -> None:
        self.cfg = cfg
        self.pin = pin
        names = {id(p): n for n, p in model.named_parameters()}
        self.records: dict[tuple[int, int], ExpertRecord] = {}
        self.layers: list[int] = []
        for block in model.moe_blocks():
            self.layers.append(block.layer_idx)
            for e, expert in enumerate(block.experts):
                if owns is not None and not owns(block.layer_idx, e):
                    continue  # another rank's share (or an expert that lives on another rank)
                params = [expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight]
                full = [names[id(p)] for p in params]
                numel = sum(p.numel() for p in params)
                layout = StateLayout(tuple(p.numel() for p in params), cfg.master, cfg.moments, cfg.quant_block)
                rec = ExpertRecord(layer=block.layer_idx, expert=e, prefix=full[0].rsplit(".", 2)[0], params=params,
                                   names=full, numel=numel, padded=align_up(layout.nbytes) // 4,
                                   shapes=[p.shape for p in params], layout=layout, codec=StateCodec(layout))
                self.records[rec.key] = rec
        self.num_experts = {block.layer_idx: len(block.experts) for block in model.moe_blocks()}
        self.pager = None  # the experts' paged compute weights, when staged init built them (resident_weights: no)
        self.by_name = {name: (rec, i) for rec in self.records.values() for i, name in enumerate(rec.names)}
        self._place()
        self._staged: dict[tuple[int, int], tuple[torch.Tensor, set[int]]] = {}  # record -> (buffer, parts written)
        if initialise:
            try:
                self._initialise()
            except BaseException:  # no one gets this store to close: delete its swap file now (Ctrl-C included)
                self.close()
                raise

    # ------------------------------------------------------------------ placement
    def _place(self) -> None:
        """Records in layer order fill the CPU budget, the rest go to NVMe (all of them under tier nvme)."""
        budget = None if self.cfg.cpu_budget_gb is None else int(self.cfg.cpu_budget_gb * 2**30)
        cpu_used = nvme_used = 0
        for rec in self.records.values():
            fits = self.cfg.tier == "cpu" and (budget is None or cpu_used + rec.state_bytes <= budget)
            if fits:
                rec.tier, rec.offset = Tier.CPU, cpu_used // 4
                cpu_used += rec.state_bytes
            else:
                rec.tier, rec.offset = Tier.NVME, nvme_used
                nvme_used += rec.state_bytes
        self.cpu_bytes, self.nvme_bytes = cpu_used, nvme_used
        self.slab = torch.empty(cpu_used // 4, dtype=torch.float32, pin_memory=self.pin)
        c = self.cfg
        self.swap: Optional[SwapFile] = open_swap(c.nvme_path, nvme_used, backend=c.nvme_backend,
                                                  block_size=c.nvme_block_size, queue_depth=c.nvme_queue_depth,
                                                  threads=c.nvme_threads)

    @torch.no_grad()
    def _initialise(self) -> None:
        """master = the model's weights in fp32, moments = 0; NVMe records are written through one buffer."""
        staging = aligned_empty(max((r.padded for r in self.records.values()), default=1), self.pin)
        for rec in self.records.values():
            flat = self.host_view(rec) if rec.tier is Tier.CPU else staging[:rec.padded]
            self.load_master(rec, flat, [p.detach() for p in rec.params])
            if rec.layout.master != "fp32":  # compute from the stored (rounded) master from the first step on
                for p, w in zip(rec.params, rec.split(rec.codec.decode_master(flat)), strict=True):
                    p.data.copy_(w)
            if rec.tier is Tier.NVME:
                self.swap.submit_write(flat, rec.offset)
                self.swap.wait_writes()

    @staticmethod
    def load_master(rec: ExpertRecord, flat: torch.Tensor, weights: list[torch.Tensor]) -> None:
        """Fill a flat state buffer: master from ``weights`` (rounded to nearest if the master is bf16),
        moments zero (in every format: code 0 of an int8 moment with scale 0 is zero), padding zero."""
        flat.zero_()
        master = torch.cat([w.reshape(-1).float() for w in weights])
        rec.codec.encode_master(flat, master)

    # ------------------------------------------------------------------ masters streamed in
    @torch.no_grad()
    def write_master(self, name: str, weight: torch.Tensor) -> None:
        """Store one expert parameter's master weight (any dtype/device) straight into its record.

        A record's moments and padding are zeroed when its first part arrives. Host-tier records are
        written in place; an NVMe record is assembled in a staging buffer and written once its last
        part arrived (so a record costs one write, and only records being assembled use host memory).
        """
        rec, idx = self.by_name[name]
        buf, done = self._staged.get(rec.key, (None, set()))
        if buf is None:
            buf = self.host_view(rec) if rec.tier is Tier.CPU else aligned_empty(rec.padded, self.pin)
            buf.zero_()
        views = rec.layout.views(buf)
        elems, _ = rec.codec.param_slices()[idx]
        value = weight.detach().reshape(-1).to(buf.device, torch.float32)
        if rec.layout.master == "bf16_kahan":
            from moetrain.offload.quantize import round_bf16_kahan

            round_bf16_kahan(value, views["master"][elems], views["comp"][elems])
        else:
            views["master"][elems].copy_(value)  # fp32, or bf16 rounded to nearest
        done.add(idx)
        if len(done) < len(rec.params):
            self._staged[rec.key] = (buf, done)
            return
        self._staged.pop(rec.key, None)
        if self.pager is not None:  # paged compute weights (a resume into staged tiers): from the stored master
            self.pager.write(rec.layer, rec.expert, rec.codec.decode_master(buf))
        elif rec.layout.master != "fp32":  # compute from the stored (rounded) master, as _initialise does
            for p, w in zip(rec.params, rec.split(rec.codec.decode_master(buf)), strict=True):
                p.data.copy_(w)
        if rec.tier is Tier.NVME:
            self.swap.submit_write(buf, rec.offset)
            self.swap.wait_writes()

    def finish_staged(self) -> None:
        """Every record must have received all its parts (the loader reports missing tensors first)."""
        if self._staged:
            names = [self.records[k].prefix for k in list(self._staged)[:3]]
            raise RuntimeError(f"expert master weights incomplete for {len(self._staged)} expert(s): {names}")

    @torch.no_grad()
    def master_weights(self, rec: ExpertRecord) -> list[torch.Tensor]:
        """The record's master weights as fp32 tensors shaped like its parameters (host copies)."""
        flat = self.host_view(rec) if rec.tier is Tier.CPU else self._read_record(rec)
        return [w.clone() for w in rec.split(rec.codec.decode_master(flat))]

    def _read_record(self, rec: ExpertRecord) -> torch.Tensor:
        buf = aligned_empty(rec.padded, self.pin)
        self.swap.submit_read(buf, rec.offset)
        self.swap.wait_reads()
        return buf

    # ------------------------------------------------------------------ access
    def host_view(self, rec: ExpertRecord) -> torch.Tensor:
        """The (padded,) host slab slice of a CPU-tier record."""
        assert rec.tier is Tier.CPU
        return self.slab[rec.offset:rec.offset + rec.padded]

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
        """Delete the swap file (idempotent); the host slab goes with the last reference to the store."""
        swap, self.swap = self.swap, None
        if swap is not None:
            swap.close()
