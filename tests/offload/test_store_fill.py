"""Filling the expert store at start-up: the bytes of every record and the compute weights equal the per-record
path the store had before (zero the record, encode the concatenated fp32 master, decode it into the parameters),
in every format and tier, across slab pieces and fill chunks; zero moments equal the codec's own encoding of
zero; and the progress report (a bar on a terminal, lines elsewhere, a last line always)."""

from __future__ import annotations

import io

import pytest
import torch
from offload_harness import tiny_model

import moetrain.offload.store as store_module
from moetrain.offload.config import OffloadConfig
from moetrain.offload.fill_progress import FillProgress
from moetrain.offload.master_segment import HOST_ENV
from moetrain.offload.nvme import ALIGN
from moetrain.offload.state_format import StateCodec, StateLayout
from moetrain.offload.store import ExpertStore, Tier
from moetrain.progress import forced

FORMATS = [("fp32", "fp32"), ("bf16_sr", "int8"), ("bf16_kahan", "bf16"), ("bf16_sr", "fp32"), ("fp32", "int8"),
           ("fp32_split", "int8")]


def _reference(model, cfg: OffloadConfig) -> tuple[dict, dict]:
    """What the store held before: per record, ``flat.zero_()`` then ``encode_master`` of the concatenated fp32
    weights; the compute weights then what the stored master computes with (compressed masters only)."""
    records, weights = {}, {}
    for block in model.moe_blocks():
        for e, expert in enumerate(block.experts):
            params = [expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight]
            layout = StateLayout(tuple(p.numel() for p in params), cfg.master, cfg.moments, cfg.quant_block)
            codec = StateCodec(layout)
            flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
            codec.encode_master(flat, torch.cat([p.detach().reshape(-1).float() for p in params]))
            records[(block.layer_idx, e)] = flat
            master, start = codec.decode_master(flat), 0
            compute = codec.compute_weights(flat, master).float()  # the stored master, or its bf16 half
            for p in params:
                size = p.numel()
                weights[id(p)] = (compute[start:start + size].view(p.shape).clone() if cfg.master != "fp32"
                                  else p.detach().clone())
                start += size
    return records, weights


def _record_bytes(store: ExpertStore, rec) -> torch.Tensor:
    """The record's whole state: a host record without its master (the weights hold it) is assembled."""
    if rec.tier is Tier.NVME:
        return store._read_record(rec).view(torch.uint8)
    return (store.whole_state(rec) if rec.host_skip else store.host_view(rec)).view(torch.uint8)


def _check_equals_reference(store: ExpertStore, model, records: dict, weights: dict) -> None:
    for rec in store:
        raw = _record_bytes(store, rec)
        want = records[rec.key]
        assert torch.equal(raw[:want.numel()], want), rec.key
        assert not raw[want.numel():].any(), rec.key  # the alignment padding
        for p in rec.params:
            assert torch.equal(p.detach(), weights[id(p)]), rec.prefix


@pytest.mark.parametrize("master,moments", FORMATS)
def test_fill_equals_the_per_record_path(master, moments):
    model = tiny_model(num_experts=8)
    cfg = OffloadConfig(tier="cpu", master=master, moments=moments, quant_block=48)  # 512 % 48: partial blocks
    records, weights = _reference(model, cfg)
    original = {id(p): p.detach().clone() for p in model.parameters()}
    store = ExpertStore(model, cfg)
    _check_equals_reference(store, model, records, weights)
    moved = [not torch.equal(p.detach(), original[id(p)]) for rec in store for p in rec.params]
    assert any(moved) if master != "fp32" else not any(moved)  # compute weights took the rounded master


@pytest.mark.parametrize("master,moments", [("fp32", "fp32"), ("bf16_sr", "int8"), ("bf16_kahan", "bf16")])
def test_fill_across_pieces_chunks_and_nvme(tmp_path, monkeypatch, master, moments):
    """Small slab pieces (records never straddle two) and fill chunks of three records (NVMe records written a
    chunk at a time through two staging buffers), a CPU budget that sends the tail to NVMe: same bytes."""
    model = tiny_model(num_experts=8)
    record = ExpertStore(model, OffloadConfig(tier="cpu", master=master, moments=moments)).max_padded * 4
    monkeypatch.setattr(store_module, "PIECE_MIN_BYTES", 4 * record)
    monkeypatch.setattr(store_module, "PIECE_MIN_RECORDS", 1)
    monkeypatch.setattr(store_module, "FILL_CHUNK_BYTES", 3 * record + ALIGN)
    monkeypatch.setenv(HOST_ENV, "1")  # whole records in host memory (test_host_drops_masters: without masters)
    cfg = OffloadConfig(tier="cpu", master=master, moments=moments, nvme_path=str(tmp_path),
                        cpu_budget_gb=9 * record / 2**30)
    records, weights = _reference(model, cfg)
    store = ExpertStore(model, cfg)
    cpu = [r for r in store if r.tier is Tier.CPU]
    assert len(cpu) == 9 and len(store.records) - len(cpu) == 7
    capacity = store.piece_capacity()
    assert capacity & (capacity - 1) == 0 and capacity >= 4 * record
    assert len(store.slabs) == -(-9 // (capacity // record)) > 1  # a piece holds whole records only
    assert all(piece.numel() * 4 <= capacity for piece in store.slabs)
    assert sum(piece.numel() for piece in store.slabs) * 4 == store.cpu_bytes == 9 * record
    for rec in cpu:  # inside its piece
        assert (rec.offset + rec.padded) * 4 <= store.slabs[rec.piece].numel() * 4
    runs = list(store._runs((3 * record) // 4))
    assert all(len(run) <= 3 for run in runs) and sum(len(run) for run in runs) == len(store.records)
    assert all(len({(r.tier, r.piece) for r, _ in run}) == 1 for run in runs)
    _check_equals_reference(store, model, records, weights)
    store.close()


@pytest.mark.parametrize("master", ["fp32", "fp32_split", "bf16_sr", "bf16_kahan"])
@pytest.mark.parametrize("moments", ["fp32", "bf16", "int8"])
def test_zero_moments_equal_the_codec_encoding_of_zero(master, moments):
    """A fresh record's moments are zero bytes, not quantizer output; they decode to what the codec's encoding of
    zero decodes to. (For int8 the codec writes the signed codebook's 0.0, code 127, for exp_avg; zero bytes are
    code 0 with scale 0: the same value 0 for every element.)"""
    layout = StateLayout((512, 300, 17), master, moments, 64)  # 829 elements: gaps between the segments
    codec = StateCodec(layout)
    weights = [torch.randn(512), torch.randn(300), torch.randn(17)]
    fresh = torch.full((layout.nbytes + ALIGN,), 0x5A, dtype=torch.uint8)  # garbage, and padding behind the record
    codec.encode_initial(fresh, weights)
    reference = torch.zeros_like(fresh)  # the per-record path: zero, then the concatenated master
    codec.encode_master(reference, torch.cat(weights))
    assert torch.equal(fresh, reference)
    encoded = torch.full((layout.nbytes,), 0x5A, dtype=torch.uint8)
    zero = torch.zeros(layout.numel)
    codec.encode(encoded, master=torch.cat(weights), exp_avg=zero, exp_avg_sq=zero)
    for which in ("exp_avg", "exp_avg_sq"):
        got, want = codec.decode_moment(fresh, which), codec.decode_moment(encoded, which)
        assert torch.equal(got, want) and torch.equal(got, zero)
    assert torch.equal(codec.decode_master(fresh), codec.decode_master(encoded))
    views = layout.views(fresh)
    assert all(not views[name].view(torch.uint8).any() for name in views if name not in ("master", "comp", "rest"))
    if moments == "int8":
        scales = layout.views(encoded)
        assert not scales["m_scale"].any() and not scales["v_scale"].any()  # the codec's scale of zero is 0 too


def test_fill_progress_lines_every_interval():
    now = [100.0]
    err = io.StringIO()
    import sys

    saved, sys.stderr = sys.stderr, err
    try:
        progress = FillProgress(8, 8 * 2**30, "filling 8 records, 8.00 GiB", bar=False, every_s=10.0,
                                clock=lambda: now[0])
        now[0] = 105.0
        progress.update(2, 2 * 2**30)  # 5 s in: no line yet
        now[0] = 110.0
        progress.update(2, 2 * 2**30)  # 10 s in: a line
        now[0] = 115.0
        progress.update(2, 2 * 2**30)
        now[0] = 120.0
        progress.update(2, 2 * 2**30)  # complete: the last line says it
        progress.close()
    finally:
        sys.stderr = saved
    lines = err.getvalue().splitlines()
    assert lines == ["expert store: filling 8 records, 8.00 GiB",
                     "expert store: 4/8 records, 4.00/8.00 GiB, 0.40 GiB/s, ETA 10 s",
                     "filled expert store: 8 records, 8.00 GiB in 20.0 s"]


def test_store_reports_its_filling_when_asked(capsys):
    model = tiny_model(num_experts=8)
    ExpertStore(model, OffloadConfig(tier="cpu"))  # a small store says nothing by default
    assert capsys.readouterr().err == ""
    store = ExpertStore(model, OffloadConfig(tier="cpu", master="bf16_sr", moments="int8"), progress=True)
    lines = capsys.readouterr().err.splitlines()
    gib = store.cpu_bytes / 2**30
    assert lines[0] == f"expert store: filling 16 records, {gib:.2f} GiB ({gib:.2f} GiB host memory)"
    assert lines[-1].startswith(f"filled expert store: 16 records, {gib:.2f} GiB in ") and lines[-1].endswith(" s")
    assert len(lines) == 2  # no interval passed


def test_store_progress_bar_on_a_terminal(capsys):
    with forced(True):
        ExpertStore(tiny_model(num_experts=8), OffloadConfig(tier="cpu"), progress=True)
    err = capsys.readouterr().err
    assert "\rexpert store:   0%|" in err  # the bar (a fill this small ends before it redraws)
    assert "filled expert store: 16 records" in err.splitlines()[-1]


def test_store_of_a_gib_reports_by_default(monkeypatch, capsys):
    model = tiny_model(num_experts=8)
    small = ExpertStore(model, OffloadConfig(tier="cpu"), initialise=False)
    monkeypatch.setattr(store_module, "PROGRESS_MIN_BYTES", small.cpu_bytes)
    ExpertStore(model, OffloadConfig(tier="cpu"))
    assert "filled expert store: 16 records" in capsys.readouterr().err


@pytest.fixture
def hf_dir(tiny_hf, save_hf, randomize):
    return save_hf(randomize(tiny_hf("qwen3_moe"), std=0.2), "qwen3", max_shard_size="40KB")


@pytest.mark.parametrize("tier,master,moments", [("cpu", "bf16_sr", "int8"), ("nvme", "bf16_kahan", "bf16"),
                                                 ("cpu", "fp32", "fp32")])
def test_staged_records_equal_the_filled_store(hf_dir, tmp_path, capsys, tier, master, moments):
    """init_from streamed into the tiers: every record's bytes and compute weight equal a store filled from the
    fully loaded model; the stream reports its records."""
    import moetrain
    from moetrain.offload.staged_init import load_into_tiers

    cfg = OffloadConfig(tier=tier, nvme_path=str(tmp_path) if tier == "nvme" else None, master=master,
                        moments=moments, quant_block=48)
    full = moetrain.from_pretrained(hf_dir)
    records, weights = _reference(full, cfg)
    filled = ExpertStore(full, cfg)
    staged, store = load_into_tiers(hf_dir, cfg, torch.device("cpu"), progress=True)
    lines = capsys.readouterr().err.splitlines()
    count = len(store.records)
    assert lines[0].startswith(f"expert store: loading masters into {count} records, ")
    gib = (store.cpu_bytes + store.nvme_bytes) / 2**30
    assert lines[-1].startswith(f"filled expert store: {count} records, {gib:.2f} GiB in ")
    for rec in store:
        ref = filled.records[rec.key]
        assert torch.equal(_record_bytes(store, rec), _record_bytes(filled, ref)), rec.key
        for p, q in zip(rec.params, ref.params, strict=True):
            assert torch.equal(p.detach().float(), q.detach().float()), rec.prefix
    _check_equals_reference(filled, full, records, weights)
    store.close()
    filled.close()


def test_an_incomplete_stream_prints_no_last_line(hf_dir, capsys):
    from moetrain.models.hf import empty_model, load_config

    model = empty_model(load_config(hf_dir), dtype=torch.float32, device="cpu")
    store = ExpertStore(model, OffloadConfig(tier="cpu"), initialise=False, progress=True)
    rec = next(iter(store))
    store.write_master(rec.names[0], torch.zeros(rec.shapes[0]))
    with pytest.raises(RuntimeError, match="incomplete"):
        store.finish_staged()
    assert "filled expert store" not in capsys.readouterr().err
