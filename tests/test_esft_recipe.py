"""The tiny ESFT demonstration end to end, at reduced steps: a base trained on the general corpus
(``recipes/tiny.yaml``), then the downstream task ``data/esft_task`` fine-tuned twice from it, fully
(``recipes/tiny-task.yaml``) and with only the experts that ``moetrain select-experts`` picks
(``recipes/tiny-esft.yaml``), each through ``moetrain.cli.main`` in its own run directory.

Frozen parameters must come out bit-identical to the base, and the task's validation perplexity of both runs is
pinned to what was measured at these steps (the full-step figures are in benchmarks/esft_tiny.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import moetrain
from moetrain.cli import main as cli_main
from moetrain.models.train_selection import load_expert_selection
from moetrain.select_experts import main as select_main

REPO = Path(__file__).resolve().parents[1]
BASE_STEPS = 100      # recipes/tiny.yaml's schedule, shortened from the note's 300
TASK_STEPS = 60       # the note's fine-tunes run 300
SEQ = ["--data.seq_len=64"]  # half the recipes' rows: the same pairs packed into twice the rows


def val_ppl(run: Path) -> float:
    return json.loads((run / "validation.jsonl").read_text().splitlines()[-1])["val_ppl"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("esft")
    base, full, esft, sel = root / "base", root / "full", root / "esft", root / "experts.json"
    cwd = Path.cwd()
    os.chdir(REPO)  # recipes name their data relative to the repository
    try:
        assert cli_main(["fit", "--config", "recipes/tiny.yaml", f"--trainer.max_steps={BASE_STEPS}",
                         f"--trainer.default_root_dir={base}"]) == 0
        assert select_main(["--config", "recipes/tiny-esft.yaml", "--ckpt", str(base), "--out", str(sel),
                            "--top_p", "0.2", *SEQ]) == 0
        common = [f"--model.init_from={base}", f"--trainer.max_steps={TASK_STEPS}",
                  f"--trainer.val_check_interval={TASK_STEPS}", *SEQ]
        assert cli_main(["fit", "--config", "recipes/tiny-task.yaml", *common,
                         f"--trainer.default_root_dir={full}"]) == 0
        assert cli_main(["fit", "--config", "recipes/tiny-esft.yaml", *common, f"--model.train.routed_experts={sel}",
                         f"--trainer.default_root_dir={esft}"]) == 0
    finally:
        os.chdir(cwd)
    return {"base": base, "full": full, "esft": esft, "selection": sel}


def test_frozen_parameters_are_bit_identical_to_the_base(runs):
    chosen = load_expert_selection(runs["selection"])
    trainable = {f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for layer, ids in chosen.items() for e in ids
                 for proj in ("gate_proj", "up_proj", "down_proj")}
    base = dict(moetrain.from_pretrained(runs["base"]).named_parameters())
    tuned = dict(moetrain.from_pretrained(runs["esft"]).named_parameters())
    assert base.keys() == tuned.keys()
    changed = {name for name, p in tuned.items() if not torch.equal(p, base[name])}
    assert changed == trainable  # every selected expert is routed tokens in 60 steps, and nothing else moved
    assert 0 < len(trainable) < len([n for n in base if ".mlp.experts." in n])



def test_task_perplexity_of_esft_and_full_fine_tuning(runs):
    """Measured at these steps (2 CPU cores): full 2.60, ESFT-Gate top_p 0.2 10.98; at the note's 300 steps 1.14
    and 3.24. ESFT does not reach full fine-tuning's perplexity on this model (the note says why); the bounds pin
    both figures, so a regression in either fails here, and so does an ESFT that closes the gap (then update the
    note and the issue's figure)."""
    full, esft = val_ppl(runs["full"]), val_ppl(runs["esft"])
    assert full < 3.0, full
    assert full < esft < 13.0, (full, esft)
