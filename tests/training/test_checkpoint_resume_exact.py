"""Exact resume through ``moetrain fit``: 12 steps straight equal 6 steps, then ``--ckpt_path=last`` to 12.

Weights, optimizer state and the per-step losses of steps 7-12 in metrics.jsonl must be identical, for
tiers none, cpu and nvme, with 2 micro-batches per step and shuffled data whose epochs are shorter than
the run (the resume lands inside an epoch). A resume under another tier gives the same result.
"""

from __future__ import annotations

import json

import pytest
import torch
from ckpt_harness import TOTAL_STEPS, fit, last, metrics, shard_tensors, small_data, write_recipe

HALF = TOTAL_STEPS // 2
LOGGED = ("loss", "ce_loss", "aux_loss", "lr", "grad_norm", "tokens")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{tier: (straight run dir, interrupted-and-resumed run dir)}, made once for the module."""
    tmp = tmp_path_factory.mktemp("resume")
    data = small_data(tmp)
    out = {}
    for tier in ("none", "cpu", "nvme"):
        recipe = write_recipe(tmp, data, tier)
        straight, resumed = tmp / f"{tier}-straight", tmp / f"{tier}-resumed"
        assert fit(recipe, straight) == 0
        assert fit(recipe, resumed, f"--trainer.max_steps={HALF}") == 0
        assert fit(recipe, resumed, "--ckpt_path=last") == 0
        out[tier] = (straight, resumed)
    out["tmp"], out["data"] = tmp, data
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("tier", ["none", "cpu", "nvme"])
def test_interrupted_run_equals_straight_run(runs, tier):
    straight, resumed = runs[tier]
    state = json.loads((resumed / "checkpoints" / f"step-{HALF}" / "trainer_state.json").read_text())
    # the resume must land inside a later epoch, or the test would not exercise the data position
    assert state["data"]["epoch"] >= 1 and state["data"]["batches_in_epoch"] > 0, state["data"]
    a, b = last(straight), last(resumed)
    assert a.name == b.name == f"step-{TOTAL_STEPS}"
    assert_same_tensors(shard_tensors(a, "model"), shard_tensors(b, "model"))
    assert_same_tensors(shard_tensors(a, "optimizer"), shard_tensors(b, "optimizer"))
    assert json.loads((a / "optimizer.json").read_text()) == json.loads((b / "optimizer.json").read_text())
    first, second = metrics(straight), metrics(resumed)
    assert [r["step"] for r in second] == list(range(1, TOTAL_STEPS + 1))
    for r, s in zip(first[HALF:], second[HALF:], strict=True):
        assert {k: r[k] for k in LOGGED} == {k: s[k] for k in LOGGED}, r["step"]
    assert shard_tensors(a, "model").keys() == shard_tensors(last(runs["none"][0]), "model").keys()


def test_the_run_moves_the_weights(runs):
    """Guards the comparisons above: the second half changes the model, and tiers are near each other."""
    straight = runs["none"][0]
    half = shard_tensors(straight.parent / "none-resumed" / "checkpoints" / f"step-{HALF}", "model")
    full = shard_tensors(last(straight), "model")
    assert max((full[k] - half[k]).abs().max().item() for k in full) > 1e-3
    losses = [r["loss"] for r in metrics(straight)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("before,after,atol", [("cpu", "nvme", 0.0), ("none", "cpu", 1e-6), ("cpu", "cpu-paged", 0.0)])
def test_resume_under_another_tier(runs, before, after, atol):
    """cpu -> nvme is the same arithmetic (bitwise); none -> cpu swaps torch AdamW for the expert engine's
    AdamW on the experts (equal to 1e-6, as the offload exactness tests find); cpu -> cpu-paged resumes
    with the compute weights paged from host memory (resident_weights=no), the same arithmetic again."""
    tmp = runs["tmp"]
    recipe = write_recipe(tmp, runs["data"], after.removesuffix("-paged"))
    run = tmp / f"{before}-to-{after}"
    ckpt = runs[before][1] / "checkpoints" / f"step-{HALF}"
    paged = ["--model.offload.placement.resident_weights=no"] if after.endswith("-paged") else []
    assert fit(recipe, run, f"--ckpt_path={ckpt}", *paged) == 0
    straight = last(runs[before][0])
    assert last(run).name == straight.name
    assert_same_tensors(shard_tensors(last(run), "model"), shard_tensors(straight, "model"), atol)
    moments = shard_tensors(last(run), "optimizer")
    reference = shard_tensors(straight, "optimizer")
    # a tier may store zero moments of a never-routed expert where another stores none
    shared = moments.keys() & reference.keys()
    assert shared and all(moments[k].abs().max() == 0 for k in moments.keys() - shared)
    assert_same_tensors({k: moments[k] for k in shared}, {k: reference[k] for k in shared}, atol)
