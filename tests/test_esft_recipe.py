"""The tiny ESFT demonstration end to end, at reduced steps: a base trained on the general corpus
(``recipes/tiny.yaml``), then the clock-arithmetic domain ``data/esft_task`` fine-tuned twice from it at the same
steps, fully (``recipes/tiny-task.yaml``) and with only the experts that ``moetrain select-experts`` picks
(``recipes/tiny-esft.yaml``), each through ``moetrain fit`` in a process of its own (so that its peak host memory
is its own).

ESFT's validation perplexity must be within 5% of full fine-tuning's, on a domain where the base is far from
both (the adaptation is real), and everything ESFT freezes (embeddings, attention, norms, routers, the shared
expert, the dense layer, the LM head, the unselected experts) must come out bit-identical to the base, with no
optimizer state. The README's ESFT section has the figures at the recipes' full steps."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import moetrain
from moetrain.cli import main as cli_main
from moetrain.models.train_selection import load_expert_selection
from moetrain.select_experts import main as select_main
from moetrain.training.data import TextDataModule

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BASE_STEPS = 400      # recipes/tiny.yaml's schedule, long enough that the base reads sums and names numbers surely
TASK_STEPS = 60       # the recipes' fine-tunes run 300
TOP_P = 0.8           # ESFT-Gate, as the README's select command
SEQ = ["--data.seq_len=64"]  # half the recipes' rows: the same records packed into twice the rows


def val_ppl(run: Path) -> float:
    return json.loads((run / "validation.jsonl").read_text().splitlines()[-1])["val_ppl"]


# the child reports its own peak resident memory as it exits: VmHWM counts this program's memory only, whereas a
# parent's rusage of a child would also count the pre-exec copy of this (large) test process
_FIT_AND_REPORT = ("import sys; from moetrain.cli import main; code = main(sys.argv[1:]); "
                   "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]; "
                   "print('peak-rss-kib', hwm[0].split()[1] if hwm else 0, file=sys.stderr); sys.exit(code)")


def fit_in_child(log: Path, recipe: str, *args: str) -> subprocess.Popen:
    """``moetrain fit --config recipe args`` started in a child process writing its stderr to ``log``."""
    with open(log, "w") as err:  # a file, not a pipe: two children run at once and neither may block on it
        return subprocess.Popen([sys.executable, "-c", _FIT_AND_REPORT, "fit", "--config", recipe, *args], cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=err)


def reap(child: subprocess.Popen, log: Path) -> int:
    """Wait for ``child``; returns its peak resident memory in bytes (0 where /proc does not say)."""
    child.wait()
    err = log.read_text()
    assert child.returncode == 0, err[-3000:]
    return int(err.rsplit("peak-rss-kib", 1)[1].split()[0]) * 1024


def optimizer_state(run: Path) -> dict[str, int]:
    """{parameter name: bytes of its optimizer state} in the run's final checkpoint."""
    step = run / "checkpoints" / (run / "checkpoints" / "last").read_text().strip()
    state: dict[str, int] = {}
    for shard in step.glob("optimizer-*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                name = key.rsplit(".", 1)[0]  # <parameter>.exp_avg / .exp_avg_sq
                state[name] = state.get(name, 0) + tensor.numel() * tensor.element_size()
    return state


@torch.no_grad()
def domain_ppl(model_dir: Path) -> float:
    """The validation perplexity of ``model_dir`` on the domain as ``moetrain fit`` logs it (exp of the
    token-weighted mean cross-entropy over data/esft_task/val.jsonl, rows of 64)."""
    data = TextDataModule(path=str(REPO / "data/esft_task/train.jsonl"), tokenizer=str(REPO / "data/tiny/tokenizer"),
                          val_path=str(REPO / "data/esft_task/val.jsonl"), format="text", seq_len=64,
                          micro_batch_size=8)
    data.prepare("fit")
    model = moetrain.from_pretrained(model_dir).eval()
    total = targets = 0.0
    for batch in data.val_dataloader():
        n = int((batch["labels"][:, 1:] != -100).sum())
        keys = ("input_ids", "labels", "position_ids", "document_ids", "attention_mask")
        out = model(**{k: batch[k] for k in keys if k in batch})
        total, targets = total + float(out.ce_loss) * n, targets + n
    return math.exp(total / targets)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("esft")
    base, full, esft, sel = root / "base", root / "full", root / "esft", root / "experts.json"
    cwd = Path.cwd()
    os.chdir(REPO)  # recipes name their data relative to the repository
    threads = torch.get_num_threads()
    try:
        assert cli_main(["fit", "--config", "recipes/tiny.yaml", f"--trainer.max_steps={BASE_STEPS}",
                         f"--trainer.default_root_dir={base}"]) == 0
        assert select_main(["--config", "recipes/tiny-esft.yaml", "--ckpt", str(base), "--out", str(sel),
                            "--top_p", str(TOP_P), *SEQ]) == 0
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    common = [f"--model.init_from={base}", f"--trainer.max_steps={TASK_STEPS}",
              f"--trainer.val_check_interval={TASK_STEPS}", *SEQ]
    # the two fine-tunes are independent single-threaded processes: run side by side
    logs = {name: root / f"{name}.log" for name in ("full", "esft")}
    children = {"full": fit_in_child(logs["full"], "recipes/tiny-task.yaml", *common,
                                     f"--trainer.default_root_dir={full}"),
                "esft": fit_in_child(logs["esft"], "recipes/tiny-esft.yaml", *common,
                                     f"--model.train.routed_experts={sel}", f"--trainer.default_root_dir={esft}")}
    rss = {name: reap(child, logs[name]) for name, child in children.items()}
    return {"base": base, "full": full, "esft": esft, "selection": sel, "rss": rss}


def trainable(selection: Path) -> set[str]:
    return {f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for layer, ids in
            load_expert_selection(selection).items() for e in ids for proj in ("gate_proj", "up_proj", "down_proj")}


def test_frozen_parameters_are_bit_identical_to_the_base_and_have_no_state(runs):
    chosen = trainable(runs["selection"])
    base = dict(moetrain.from_pretrained(runs["base"]).named_parameters())
    tuned = dict(moetrain.from_pretrained(runs["esft"]).named_parameters())
    assert base.keys() == tuned.keys()
    changed = {name for name, p in tuned.items() if not torch.equal(p, base[name])}
    assert changed == chosen  # every selected expert is routed tokens in 60 steps, and nothing else moved
    assert 0 < len(chosen) < len([n for n in base if ".mlp.experts." in n])
    assert set(optimizer_state(runs["esft"])) == chosen  # frozen parameters have no optimizer state


def test_esft_perplexity_is_within_5_percent_of_full_fine_tuning(runs):
    """At the same steps, data and base. The base is far from both (the domain's answers past twelve are new to
    it), so the bound says that ESFT made the adaptation, not that there was none to make."""
    full, esft = val_ppl(runs["full"]), val_ppl(runs["esft"])
    base = domain_ppl(runs["base"])
    assert abs(domain_ppl(runs["full"]) - full) < 1e-3 * full  # the base's figure is measured as fit logs it
    trained = sum(p.numel() for name, p in moetrain.from_pretrained(runs["base"]).named_parameters()
                  if name in trainable(runs["selection"]))
    total = moetrain.from_pretrained(runs["base"]).num_parameters()
    state = {name: sum(optimizer_state(runs[name]).values()) for name in ("full", "esft")}
    print(f"\ndomain val ppl at step {TASK_STEPS}: base {base:.3f}, full fine-tuning {full:.3f}, "
          f"ESFT (top_p {TOP_P}) {esft:.3f} ({100 * (esft / full - 1):+.1f}%); trained parameters: ESFT "
          f"{trained:,} of {total:,} ({100 * trained / total:.1f}%); optimizer state: full {state['full']:,} B, "
          f"ESFT {state['esft']:,} B; peak host RSS: full {runs['rss']['full'] / 2**20:.0f} MiB, "
          f"ESFT {runs['rss']['esft'] / 2**20:.0f} MiB")
    assert esft <= 1.05 * full, (esft, full)
    assert base > 1.5 * full, (base, full)  # the domain needed adapting: the base is far above both
    assert state["full"] == 8 * total and state["esft"] == 8 * trained  # two fp32 moments per trained parameter
