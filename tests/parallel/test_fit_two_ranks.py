"""``moetrain fit`` with ``trainer.devices=2`` on the CPU (Lightning's processes over gloo, the moetrain_parallel
strategy, expert_parallel 2, expert state in host memory) ends with the weights of a one-process run whose
micro-batch is the two ranks' together, writes one checkpoint from both ranks, and that checkpoint resumes
mid-epoch in one process to the same weights (data position included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from moetrain.cli import main
from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.training.checkpoint import load_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "tiny"
# eps 1e-4: some attention weights (keys along softmax's shift direction) have an exact gradient of zero; Adam with
# eps 1e-8 turns the fp32 rounding left there, which differs with the batch split, into lr-sized steps of either sign
COMMON = ["fit", "--config", str(ROOT / "recipes" / "tiny.yaml"), "--trainer.accelerator=cpu", "--trainer.max_steps=3",
          "--model.offload.placement.tier=cpu", "--model.config=null", "--model.optimizer.eps=1e-4",
          "--data.seq_len=32",
          f"--data.path={DATA / 'train.jsonl'}",
          f"--data.tokenizer={DATA / 'tokenizer'}", f"--data.val_path={DATA / 'val.jsonl'}"]


def decisive_init(run_dir: Path) -> Path:
    """A 2-layer tiny-deepseek-moe with N(0, 0.2) matrices: router scores far from ties, so that the two runs'
    fp32 summation orders cannot flip a top-k choice (the preset's 0.02 init leaves near-ties)."""
    torch.manual_seed(0)
    model = MoEForCausalLM(ModelConfig.from_preset("tiny-deepseek-moe", vocab_size=768, num_hidden_layers=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    save_checkpoint(run_dir, 1, model)
    return run_dir


def test_fit_on_two_ranks_equals_one_process(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    init = f"--model.init_from={decisive_init(tmp_path / 'init')}"
    cmd = [sys.executable, "-m", "moetrain.cli", *COMMON, init, "--trainer.devices=2", "--parallel.expert_parallel=2",
           "--data.micro_batch_size=2", "--checkpoint.every_n_steps=2", f"--trainer.default_root_dir={two}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*COMMON, init, "--trainer.devices=1", "--data.micro_batch_size=4",
                 f"--trainer.default_root_dir={one}"]) == 0

    ckpt_two, ckpt_one = two / "checkpoints" / "step-3", one / "checkpoints" / "step-3"
    assert {p.name for p in ckpt_two.glob("model-rank*.safetensors")} >= {
        "model-rank00000-00001-of-00001.safetensors", "model-rank00001-00001-of-00001.safetensors"}
    trained_two, trained_one = load_model(ckpt_two).state_dict(), load_model(ckpt_one).state_dict()
    initial = load_model(tmp_path / "init" / "checkpoints" / "step-1").state_dict()
    assert trained_two.keys() == trained_one.keys()
    for name, tensor in trained_one.items():
        torch.testing.assert_close(trained_two[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    assert not torch.equal(trained_one["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    # metrics.jsonl counts the tokens of all ranks: the same as the one process with the doubled micro-batch
    import json

    def tokens(run: Path) -> list[int]:
        return [json.loads(line)["tokens"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert tokens(two) == tokens(one) and tokens(one)[-1] > 0

    # 2 -> 1: the 2-rank checkpoint of step 2, resumed by one process, reaches the same step 3
    resumed = tmp_path / "resumed"
    assert main([*COMMON, init, "--trainer.devices=1", "--data.micro_batch_size=4",
                 f"--trainer.default_root_dir={resumed}", f"--ckpt_path={two / 'checkpoints' / 'step-2'}"]) == 0
    again = load_model(resumed / "checkpoints" / "step-3").state_dict()
    for name, tensor in trained_one.items():
        torch.testing.assert_close(again[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
