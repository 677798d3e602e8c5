"""The experts' state as checkpoints and exports see it: streams of named tensors out, named tensors in.

Out: every record's fp32 master (``{name}``) and its moments in the stored format (``{name}.exp_avg``,
``{name}.exp_avg_sq``, and the 8-bit moments' block scales ``{name}.exp_avg.absmax``), one record at a time
(NVMe records are paged through a staging buffer of their own). In: the same names, any order; a master also
becomes the model's compute weight. An asynchronous save reads through :meth:`ExpertStateIO.background`, a
reader with its own staging buffer and swap-file channel, never through the swapper (the training thread's).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator

import torch

from moetrain.offload.compute_weights import WeightWriter
from moetrain.offload.host_state import HostState
from moetrain.offload.store import ExpertRecord, ExpertStore
from moetrain.offload.swapper import Swapper

MOMENTS = ("exp_avg", "exp_avg_sq")
_INT8_HINT = "the checkpoint holds 8-bit moments; resume with model.offload.state.moments=int8 (or from a checkpoint " \
             "with fp32 moments)"


class ExpertStateIO:
    """Named-tensor streams over the expert store.

    Args:
        store: the expert records.
        swapper: the device slots (flushed and invalidated before a load writes a tier).
        host: the host-state reader of the training thread.
        writer: where a loaded master's compute weights go.
        finalize: makes the store current (catch-up applied, page-outs landed) before it is read.
    """

    def __init__(self, store: ExpertStore, swapper: Swapper, host: HostState, writer: WeightWriter, *,
                 finalize: Callable[[], None]) -> None:
        self.store, self.swapper, self.host, self.writer, self.finalize = store, swapper, host, writer, finalize
        self._reader = None  # the last background reader (kept for its staging buffer and channel)

    def background(self) -> ExpertStateIO:
        """A reader for a writer thread: its ``finalize`` is a no-op (it ran on the training thread when the state
        was taken), its host reader is its own, kept for the next saves of the same store."""
        previous = self._reader
        reader = copy.copy(self)
        reader._reader = None
        reader.finalize = lambda: None
        reader.host = previous.host if previous is not None else HostState(self.store)
        self._reader = reader
        return reader

    def _each_state(self) -> Iterator[tuple[ExpertRecord, torch.Tensor]]:
        """Every record's current flat state in host memory, one record at a time (NVMe paged through)."""
        self.finalize()
        for rec in self.store:
            yield rec, self.host.read(rec)

    def named_master_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(parameter name, fp32 master weight) of every expert parameter; tensors are fresh copies. Frozen experts
        (no record) follow with their weights as they are, in fp32: from the parameters, or from the pager's rows
        when the compute weights are paged (the parameters are placeholders then)."""
        for rec, flat in self._each_state():
            for name, w in zip(rec.names, rec.split(rec.parts(flat)[0]), strict=True):
                yield name, w.clone()
        for fx in self.store.frozen.values():
            yield from zip(fx.names, fx.weights(self.store.pager), strict=True)

    def named_optimizer_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(``{name}.exp_avg`` / ``{name}.exp_avg_sq``, tensor) of every expert parameter, in the stored
        format: fp32, bf16, or uint8 codes followed by their per-block scales ``{name}.exp_avg.absmax``."""
        for rec, flat in self._each_state():
            views = rec.layout.views(flat)
            for which, scale in (("exp_avg", "m_scale"), ("exp_avg_sq", "v_scale")):
                for name, part in zip(rec.names, rec.split(views[which]), strict=True):
                    yield f"{name}.{which}", part.clone()
                if rec.layout.moments == "int8":
                    for name, (_, blocks) in zip(rec.names, rec.codec.param_slices(), strict=True):
                        yield f"{name}.{which}.absmax", views[scale][blocks].clone()

    @torch.no_grad()
    def load(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load tensors named as the streams yield them. fp32 moments load into any moment format (quantized or
        rounded here); stored bf16 / int8 moments load into the same format. NVMe records are
        read-modified-written one tensor at a time. A frozen expert's master becomes its compute weight; its moments
        (from a run that trained it) are dropped: it has no state."""
        self.swapper.flush()
        for name, tensor in named:
            which, absmax = "master", name.endswith(".absmax")
            if absmax:
                name = name[: -len(".absmax")]
            for suffix in MOMENTS:
                if name.endswith("." + suffix):
                    name, which = name[: -len(suffix) - 1], suffix
            if name in self.store.frozen_by_name:  # a frozen expert: its weight only (moments: it has none)
                if which == "master" and not absmax:
                    fx, idx = self.store.frozen_by_name[name]
                    fx.write(idx, tensor, self.store.pager)
                continue
            if name not in self.store.by_name:
                raise KeyError(f"{name!r} is not an expert parameter of this model")
            rec, idx = self.store.by_name[name]
            self.swapper.invalidate(rec)
            flat = self.host.read(rec)
            self._load_one(rec, idx, flat, which, absmax, tensor, name if which == "master" else f"{name}.{which}")
            self.host.write(rec, flat)

    def _load_one(self, rec: ExpertRecord, idx: int, flat: torch.Tensor, which: str, absmax: bool,
                  tensor: torch.Tensor, label: str) -> None:
        elems, blocks = rec.codec.param_slices()[idx]
        views = rec.layout.views(flat)
        if absmax:
            if rec.layout.moments != "int8":
                raise ValueError(f"{label}.absmax: {_INT8_HINT}")
            _copy_checked(views["m_scale" if which == "exp_avg" else "v_scale"][blocks], tensor, label)
        elif which == "master":
            master = rec.codec.decode_master(flat)
            if master.data_ptr() == views["master"].data_ptr():  # fp32: a view, written in place
                master = master.clone()
            _copy_checked(master[elems].view(rec.shapes[idx]), tensor, label)
            rec.codec.encode_master(flat, master)
            self.writer.write_param(rec, idx, rec.codec.compute_weights(flat, master), elems=elems)
        elif tensor.dtype == views[which].dtype:  # the stored format itself: copied as is
            _copy_checked(views[which][elems].view(rec.shapes[idx]), tensor, label)
        elif tensor.dtype == torch.uint8:
            raise ValueError(f"{label}: {_INT8_HINT}")
        else:  # e.g. fp32 moments into bf16 or int8 ones: decode, replace this parameter's part, encode
            value = rec.codec.decode_moment(flat, which).clone()
            _copy_checked(value[elems].view(rec.shapes[idx]), tensor.float(), label)
            rec.codec.encode_moment(flat, which, value)


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, label: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{label}: shape {tuple(src.shape)} != {tuple(dst.shape)}")
    dst.copy_(src)
