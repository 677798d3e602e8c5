"""When a fit on the GPU ends, the model stays on the GPU: Lightning's strategy teardown would copy every weight and
gradient into pageable host memory (``module.cpu()``), tens of GiB for a real MoE model beside its pinned expert
store. Run on the GPU machine: ``python -m pytest -q tests/gpu/test_teardown_cuda.py``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from moetrain.offload.config import OffloadSettings, PlacementSettings
from moetrain.optim import OptimizerConfig
from moetrain.training.data import TextDataModule
from moetrain.training.module import MoETrainingModule
from moetrain.training.telemetry import proc_gib

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TINY = Path(__file__).resolve().parents[2] / "data" / "tiny"


def test_fit_on_the_gpu_leaves_the_model_there(tmp_path):
    # 3 MoE layers of 64 experts of 512 x 1024: 0.6 GiB of bf16 expert weights resident on the GPU (and as much in
    # gradients), the state in pinned memory
    config = dict(vocab_size=768, hidden_size=512, num_hidden_layers=4, num_experts=64, moe_intermediate_size=1024)
    offload = OffloadSettings(placement=PlacementSettings(tier="cpu", gpu_budget_gb=0.5))
    module = MoETrainingModule(preset="tiny-deepseek-moe", config=config, offload=offload,
                               optimizer=OptimizerConfig(lr=1e-3, warmup_steps=1))
    data = TextDataModule(str(TINY / "val.jsonl"), str(TINY / "tokenizer"), seq_len=64, micro_batch_size=2)
    anon = {"RssAnon": "anon"}
    at_end: list[float] = []

    class TrainEnd(L.Callback):
        def on_train_end(self, trainer, pl_module):  # the last step is done; Lightning's teardown comes after
            at_end.append(proc_gib("/proc/self/status", anon)["anon"])

    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=2, precision="bf16-mixed", callbacks=[TrainEnd()],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    assert {p.device.type for p in module.parameters()} == {"cuda"}
    # a move to the host would have added the model's weights and gradients (over 1.2 GiB) to the private heap
    assert proc_gib("/proc/self/status", anon)["anon"] - at_end[0] < 0.6
