"""Data parallel and expert parallel on 2 GPUs over NCCL against one GPU (the CPU tests' scenarios, fp32).

Skipped without 2 CUDA devices. GPU reductions sum in another order than the CPU, so the tolerance is 1e-4.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA devices", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
import parallel_harness as h  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("tier,ep", [("cpu", 1), ("cpu", 2), ("none", 2)])
def test_two_gpus_match_one(tmp_path, tier, ep):
    ref = h.reference(tier, device="cuda:0")
    scenario = dict(name=f"{tier}_ep{ep}", tier=tier, ep=ep, device="cuda")
    mp.spawn(h.worker, args=(2, _free_port(), str(tmp_path), [scenario], "nccl"), nprocs=2, join=True)
    seen = set()
    for r in range(2):
        got = torch.load(tmp_path / f"{scenario['name']}_rank{r}.pt")
        torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(ref["norms"]), rtol=1e-4, atol=0)
        for name, tensor in got["weights"].items():
            torch.testing.assert_close(tensor, ref["weights"][name], rtol=1e-4, atol=1e-4, msg=f"rank {r}: {name}")
            seen.add(name)
    assert seen == set(ref["weights"])
