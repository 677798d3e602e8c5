"""Data parallel (partitioned expert state) and expert parallel runs on 2 CPU processes over gloo, against
one process on the same global batches: equal weights after 10 steps, a starved rank, resharded resumes."""

from __future__ import annotations

import socket
import time

import parallel_harness as h
import pytest
import torch
import torch.multiprocessing as mp

from moetrain.offload.store import ExpertStore
from moetrain.parallel.checkpoint import expert_of

STARVED = range(4, 8)  # the experts rank 1 holds under expert_parallel: 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """References in this process, then one 2-process spawn that runs every scenario."""
    out = tmp_path_factory.mktemp("parallel")
    torch.set_num_threads(1)
    ref = {
        "cpu": h.reference("cpu", checkpoint_at=5, run_dir=out / "single_run"),
        "none": h.reference("none"),
        "starved": h.reference("cpu", starved=STARVED),
        "grouped": h.reference("cpu", impl="grouped"),
    }
    single_ckpt = out / "single_run" / "checkpoints" / "step-5"
    scenarios = [
        dict(name="dp_cpu", tier="cpu", ep=1),
        dict(name="ep_cpu", tier="cpu", ep=2, checkpoint_at=5),
        dict(name="ep_none", tier="none", ep=2),
        dict(name="dp_none", tier="none", ep=1),
        dict(name="starved", tier="cpu", ep=2, starved=STARVED),
        dict(name="resume_1to2", tier="cpu", ep=1, resume_from=single_ckpt),
        dict(name="ep_grouped", tier="cpu", ep=2, impl="grouped"),
    ]
    spawned = mp.spawn(h.worker, args=(2, _free_port(), str(out), scenarios), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not spawned.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in spawned.processes:
                process.kill()
            pytest.fail("the 2-process runs did not finish within 300 s: a collective hangs")
    got = {s["name"]: [torch.load(out / f"{s['name']}_rank{r}.pt") for r in range(2)] for s in scenarios}
    return {"ref": ref, "got": got, "out": out}


def _assert_weights(ranks: list[dict], ref: dict) -> None:
    """Every tensor any rank holds equals the reference; together the ranks hold every tensor; every rank
    saw the reference's global gradient norms."""
    reference = ref["weights"]
    seen = set()
    for r, result in enumerate(ranks):
        if len(result["norms"]) == len(ref["norms"]):
            torch.testing.assert_close(torch.tensor(result["norms"]), torch.tensor(ref["norms"]), rtol=1e-5, atol=0)
        for name, tensor in result["weights"].items():
            torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-5, msg=f"rank {r}: {name}")
            seen.add(name)
    assert seen == set(reference)


def test_data_parallel_partitioned_state_matches_one_process(runs):
    ranks = runs["got"]["dp_cpu"]
    _assert_weights(ranks, runs["ref"]["cpu"])
    # each rank holds the optimizer state of half the experts, disjoint, together all of them
    owned = [set(r["owned"]) for r in ranks]
    experts = {n for n in runs["ref"]["cpu"]["weights"] if ".mlp.experts." in n}
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == experts
    assert ranks[0]["records"] == ranks[1]["records"] == 2 * h.NUM_EXPERTS // 2
    # host memory of expert state per rank: half of one process's
    whole = ExpertStore(h.tiny_model(), h.offload("cpu")).cpu_bytes
    assert ranks[0]["cpu_bytes"] == ranks[1]["cpu_bytes"] == whole // 2


def test_data_parallel_replicated_tier_none_matches_one_process(runs):
    _assert_weights(runs["got"]["dp_none"], runs["ref"]["none"])


def test_expert_parallel_matches_one_process(runs):
    for name, tier in (("ep_cpu", "cpu"), ("ep_none", "none"), ("ep_grouped", "grouped")):
        ranks = runs["got"][name]
        _assert_weights(ranks, runs["ref"][tier])
        held = [{n for n in r["weights"] if ".mlp.experts." in n} for r in ranks]
        assert held[0].isdisjoint(held[1]), name  # each rank holds only its own experts' weights


def test_starved_rank_completes_and_matches(runs):
    ranks = runs["got"]["starved"]
    assert ranks[1]["owned"] and {expert_of(n) for n in ranks[1]["owned"]} == set(STARVED)
    _assert_weights(ranks, runs["ref"]["starved"])
    # rank 1's experts never got a token: untouched, exactly their initial weights
    initial = dict(h.tiny_model().named_parameters())
    for name, tensor in ranks[1]["weights"].items():
        if ".mlp.experts." in name:
            assert torch.equal(tensor, initial[name].detach()), name


def test_resume_one_rank_checkpoint_on_two(runs):
    _assert_weights(runs["got"]["resume_1to2"], runs["ref"]["cpu"])


def test_resume_two_rank_checkpoint_on_one(runs):
    ckpt = runs["out"] / "ep_cpu_run" / "checkpoints" / "step-5"
    files = {p.name for p in ckpt.iterdir()}
    assert any(f.startswith("model-rank00001") for f in files)  # rank 1 wrote its own shards
    resumed = h.resume_single(ckpt, "cpu")
    for name, tensor in runs["ref"]["cpu"]["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], tensor, rtol=1e-5, atol=1e-5, msg=name)
