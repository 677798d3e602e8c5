"""The training module under a real Lightning Trainer, against a plain PyTorch loop.

Checks: accumulation inside the module equals a hand-written loop of mean micro-batch loss,
clip_grad_norm_ and torch.optim.AdamW; ``max_steps`` counts optimizer steps; the logged loss is the
mean over micro-batches; the final checkpoint reloads into an identical model and optimizer state;
a resume continues the step count and the optimizer state.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from moetrain.optim import OptimizerConfig, lr_at, param_groups
from moetrain.training.callbacks import MetricsLogger, read_metrics
from moetrain.training.checkpoint import load_model, load_optimizer_state
from moetrain.training.checkpoint_callback import CheckpointCallback
from moetrain.training.data import TextDataModule
from moetrain.training.module import MoETrainingModule

TINY = Path(__file__).resolve().parents[2] / "data" / "tiny"
SMALL = dict(vocab_size=768, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, num_experts=4, moe_intermediate_size=16)
OPT = OptimizerConfig(lr=1e-2, warmup_steps=1, max_grad_norm=0.5, weight_decay=0.1)


def make_module(accumulate: int = 1) -> MoETrainingModule:
    return MoETrainingModule(preset="tiny-deepseek-moe", config=SMALL, optimizer=OPT,
                             accumulate_grad_batches=accumulate)


def make_data() -> TextDataModule:
    return TextDataModule(str(TINY / "val.jsonl"), str(TINY / "tokenizer"), seq_len=32, micro_batch_size=2,
                          shuffle=False)


def fit(module: MoETrainingModule, run_dir: Path, max_steps: int, **kwargs) -> tuple[L.Trainer, list[int]]:
    """Fit on CPU; returns the trainer and the batch indices training_step saw."""
    seen: list[int] = []
    original = module.training_step

    def counting_step(batch, batch_idx):
        seen.append(batch_idx)
        return original(batch, batch_idx)

    module.training_step = counting_step
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(run_dir),
                        limit_val_batches=0, callbacks=[MetricsLogger(), CheckpointCallback()])
    trainer.fit(module, datamodule=make_data(), **kwargs)
    return trainer, seen


def test_accumulation_equals_plain_torch_loop(tmp_path):
    torch.manual_seed(0)
    module = make_module(accumulate=2)
    reference = copy.deepcopy(module.model)
    trainer, seen = fit(module, tmp_path, max_steps=3)
    assert trainer.global_step == 3 and len(seen) == 6  # max_steps counts optimizer steps, not micro-batches

    data = make_data()
    data.setup("fit")
    batches = iter(data.train_dataloader())
    opt = torch.optim.AdamW(param_groups(reference.named_parameters(), OPT.weight_decay), lr=OPT.lr, betas=OPT.betas,
                            eps=OPT.eps)
    expected_losses = []
    for step in range(3):
        losses = []
        for _ in range(2):
            b = next(batches)
            loss = reference(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"],
                             document_ids=b["document_ids"]).loss
            (loss / 2).backward()
            losses.append(loss.item())
        expected_losses.append(sum(losses) / 2)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), OPT.max_grad_norm)
        for group in opt.param_groups:
            group["lr"] = lr_at(OPT, step, 3)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for (name, p), q in zip(module.model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)

    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in records]), torch.tensor(expected_losses))
    assert [r["lr"] for r in records] == [lr_at(OPT, s, 3) for s in range(3)]
    assert all(r["tokens"] == 2 * 2 * 32 * r["step"] for r in records)
    assert all(abs(r["loss"] - r["ce_loss"] - r["aux_loss"]) < 1e-5 for r in records)


def test_final_checkpoint_reloads_identical_model_and_optimizer(tmp_path):
    torch.manual_seed(0)
    module = make_module()
    fit(module, tmp_path, max_steps=2)
    root = tmp_path / "checkpoints"
    assert (root / "last").read_text().strip() == "step-2"
    ckpt = root / "step-2"
    loaded = load_model(ckpt)
    trained = module.model.state_dict()
    assert loaded.state_dict().keys() == trained.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    steps, moments = load_optimizer_state(ckpt)  # keyed by parameter name, whatever the tier
    live = module.train_optimizer.opt
    names = {id(p): n for n, p in module.model.named_parameters()}
    live_state = {names[id(p)]: live.state[p] for group in live.param_groups for p in group["params"]}
    assert steps == {n: int(state["step"]) for n, state in live_state.items()}
    assert moments.keys() == {f"{n}.{part}" for n in live_state for part in ("exp_avg", "exp_avg_sq")}
    for name, state in live_state.items():
        for part in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[f"{name}.{part}"], state[part]), (name, part)
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    assert trainer_state["step"] == 2 and trainer_state["tokens"] == 2 * 2 * 32


def test_resume_continues_steps_and_optimizer_state(tmp_path):
    torch.manual_seed(0)
    fit(make_module(), tmp_path, max_steps=2)
    resumed = make_module()
    resumed.resume_from(tmp_path / "checkpoints" / "step-2")
    trainer, seen = fit(resumed, tmp_path, max_steps=4)
    assert trainer.global_step == 4 and len(seen) == 2
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["lr"] for r in records[2:]] == [lr_at(OPT, 2, 4), lr_at(OPT, 3, 4)]
    steps = {int(s["step"]) for s in resumed.train_optimizer.state_dict()["state"].values()}
    assert steps <= {3, 4} and 4 in steps  # Adam's per-parameter step counters continued from 2
    assert (tmp_path / "checkpoints" / "last").read_text().strip() == "step-4"


def test_strategy_teardown_leaves_the_model_where_it_is():
    """Lightning's Strategy.teardown calls module.cpu() when fit ends or fails: for an offloaded model on a GPU that
    copied every resident weight and gradient into host memory (an OOM kill). The parameters stay where they are
    (here on the meta device, which any move would leave)."""
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies import SingleDeviceStrategy

    module = make_module().to("meta")
    strategy = SingleDeviceStrategy(device=torch.device("cpu"), accelerator=CPUAccelerator())
    strategy.connect(module)
    strategy.teardown()
    assert {p.device.type for p in module.parameters()} == {"meta"}
    with pytest.raises(NotImplementedError, match="meta tensor"):  # an explicit move still moves (meta has no data)
        module.to("cpu")
