"""Filling the expert store through the GPU: records encoded on the device a chunk at a time and copied into
pinned slab pieces (or staged into NVMe writes) hold the same bytes, and leave the same compute weights, as the
CPU fill, which the CPU tests compare with the per-record path; the pieces are pinned, and the allocator setting
used to pin them is given back.

Run on the GPU machine: ``python -m pytest -q tests/gpu/test_store_fill_cuda.py``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "offload"))
from offload_harness import tiny_model  # noqa: E402

import moetrain.offload.store as store_module  # noqa: E402
from moetrain.offload.config import OffloadConfig  # noqa: E402
from moetrain.offload.nvme import ALIGN  # noqa: E402
from moetrain.offload.store import ExpertStore, Tier  # noqa: E402


def _bytes(store: ExpertStore, rec) -> torch.Tensor:
    """The record's whole state (a host record without its master takes it from the weights: host_drops_masters)."""
    flat = store.whole_state(rec) if rec.tier is Tier.CPU else store._read_record(rec)
    return flat.view(torch.uint8)


@pytest.mark.parametrize("master,moments", [("fp32", "fp32"), ("bf16_sr", "int8"), ("bf16_kahan", "bf16"),
                                            ("bf16_sr", "fp32"), ("fp32_split", "int8")])
def test_gpu_fill_equals_cpu_fill(tmp_path, monkeypatch, master, moments):
    model = tiny_model(num_experts=8)
    record = ExpertStore(model, OffloadConfig(tier="cpu", master=master, moments=moments),
                         initialise=False).max_padded * 4
    monkeypatch.setattr(store_module, "PIECE_MIN_BYTES", 4 * record)  # several pieces
    monkeypatch.setattr(store_module, "PIECE_MIN_RECORDS", 1)
    monkeypatch.setattr(store_module, "FILL_CHUNK_BYTES", 3 * record + ALIGN)  # several chunks
    cfg = OffloadConfig(tier="cpu", master=master, moments=moments, quant_block=48, nvme_path=str(tmp_path),
                        cpu_budget_gb=9 * record / 2**30)
    gpu_model = copy.deepcopy(model).cuda()
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    settings = get() if get is not None else None
    on_gpu = ExpertStore(gpu_model, cfg, pin=True)
    assert (get() if get is not None else None) == settings
    on_cpu = ExpertStore(model, cfg)
    assert len(on_gpu.slabs) > 1 and all(piece.is_pinned() for piece in on_gpu.slabs)
    assert {r.tier for r in on_gpu} == {Tier.CPU, Tier.NVME}
    for rec in on_gpu:
        ref = on_cpu.records[rec.key]
        assert torch.equal(_bytes(on_gpu, rec), _bytes(on_cpu, ref)), rec.key
        for p, q in zip(rec.params, ref.params, strict=True):
            assert p.device.type == "cuda" and torch.equal(p.detach().cpu(), q.detach()), rec.prefix
    on_gpu.close()
    on_cpu.close()

