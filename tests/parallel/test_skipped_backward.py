"""A rank whose micro-batches put no trained parameter in the graph skips backward (ESFT: frozen dense parts, none
of its tokens routed to a selected expert). The gradient reduction must still meet the other ranks' collective
with matching buffers: its dense gradients count as zeros, and a parameter no rank has a gradient for stays None,
as in one process. Two CPU processes over gloo."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import parallel_harness as h
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moetrain.parallel.config import ParallelConfig
from moetrain.parallel.runtime import ParallelRuntime

UNTOUCHED = "model.layers.0.self_attn.o_proj.weight"  # its gradient is dropped on every rank before the reduction


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = h.tiny_model()
        runtime = ParallelRuntime(ParallelConfig())
        opt = runtime.build_optimizer(model, h.OPTIM, h.offload("none"))
        ids, labels = (t[2 * rank:2 * rank + 2] for t in h.global_batch(0))
        out = model(ids, labels=labels, return_logits=False)
        loss = runtime.loss_for_backward(out, {"labels": labels})  # both ranks: its token count is a collective
        if rank == 0:  # rank 1 skips its backward, as the training step does for a loss without a gradient
            loss.backward()
        params = dict(model.named_parameters())
        params[UNTOUCHED].grad = None
        local = {n: None if p.grad is None else p.grad.clone() for n, p in params.items() if ".mlp.experts." not in n}
        opt.synchronize_gradients()
        reduced = {n: None if p.grad is None else p.grad.clone() for n, p in params.items()
                   if ".mlp.experts." not in n}
        torch.save({"local": local, "reduced": reduced}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_rank_that_skipped_backward_joins_the_reduction(tmp_path):
    spawned = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not spawned.join(timeout=2):
        if time.monotonic() > deadline:
            for process in spawned.processes:
                process.kill()
            pytest.fail("the reduction hung: the ranks' collectives did not match")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert all(g is None for g in r1["local"].values())
    assert r0["reduced"][UNTOUCHED] is None and r1["reduced"][UNTOUCHED] is None
    dense = [n for n, g in r0["local"].items() if g is not None]
    assert dense, "rank 0 has dense gradients"
    for name in dense:  # the sum over ranks is rank 0's own gradient, on both ranks
        torch.testing.assert_close(r0["reduced"][name], r0["local"][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(r1["reduced"][name], r0["local"][name], rtol=0, atol=0, msg=name)
