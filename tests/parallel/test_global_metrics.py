"""metrics.jsonl under ``trainer.devices=2`` (two CPU processes over gloo) holds the global batch's figures, not
rank 0's: from identical weights and the same global batch, step 1's loss, ce_loss, aux_loss, per-layer aux loss
and routing entropy (from the expert loads of both ranks) equal those of one process whose micro-batch is the two
ranks' together, and so do the validation figures in validation.jsonl (each rank validates half the rows).

Tolerance: the two runs compute the same per-token losses from different batch shapes (the CPU kernels block
and order their fp32 sums by shape) and sum them in another order (each rank's mean, weighted by its target
count, then the sum over ranks). Higham's bound for a reordered fp32 sum of n terms is n * u * sum|terms|
(u = 2**-24); the longest sums behind a logit are the hidden-size dot products, n = 128 for tiny-deepseek-moe,
so 128 * 2**-24 = 7.6e-6 relative to the sum of magnitudes. rtol 1e-5 (atol 1e-7 for the aux losses, which
are about 1e-3) covers that. Rank 0's own micro-batches give a loss 2% away from the global one here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_fit_two_ranks import COMMON, ROOT, decisive_init

from moetrain.cli import main

# one optimizer step of 2 micro-batches, then a validation on 2 batches (8 rows either way: with 2 ranks each
# validates 2 batches of 2 rows, rank r the rows r, r + 2, ...)
SAME = ["--trainer.max_steps=1", "--model.accumulate_grad_batches=2", "--checkpoint.save_final=false",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2"]
RTOL, ATOL = 1e-5, 1e-7


def first_record(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


def test_two_ranks_log_the_global_batch_loss(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    init = f"--model.init_from={decisive_init(tmp_path / 'init')}"
    cmd = [sys.executable, "-m", "moetrain.cli", *COMMON, init, *SAME, "--trainer.devices=2",
           "--parallel.expert_parallel=2", "--data.micro_batch_size=2", f"--trainer.default_root_dir={two}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*COMMON, init, *SAME, "--trainer.devices=1", "--data.micro_batch_size=4",
                 f"--trainer.default_root_dir={one}"]) == 0

    got, expected = first_record(two), first_record(one)
    assert got["step"] == expected["step"] == 1 and got["tokens"] == expected["tokens"]
    keys = ["loss", "ce_loss", "aux_loss"] + sorted(k for k in expected if k.startswith(("aux_loss/", "routing/")))
    assert len(keys) > 3 and set(keys) <= set(got)
    for key in keys:
        assert got[key] == pytest.approx(expected[key], rel=RTOL, abs=ATOL), key
    # validation after the same update, over all ranks' rows: the perplexity token-weighted; the losses as the mean
    # over ranks of each rank's mean, which is the global mean here (packed rows: every batch has as many targets)
    val_two, val_one = (json.loads((run / "validation.jsonl").read_text()) for run in (two, one))
    assert val_two["step"] == val_one["step"] == 1
    for key in ("val_loss", "val_ce_loss", "val_aux_loss", "val_ppl"):
        assert val_two[key] == pytest.approx(val_one[key], rel=RTOL, abs=ATOL), key
