"""Two-process CPU runs over gloo for the parallel tests, and the single-process loop they are compared with.

Every scenario trains the same tiny DeepSeek-MoE model on the same global batches: a single process
takes each (4, 16) global batch whole; with 2 ranks, rank r takes rows [2r, 2r + 2), a disjoint half,
and its loss is scaled so that the sum over ranks is the global batch's loss.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig
from moetrain.optim import OptimizerConfig, lr_at
from moetrain.parallel.config import ParallelConfig
from moetrain.parallel.runtime import ParallelRuntime

STEPS = 10
GLOBAL_ROWS, SEQ, VOCAB = 4, 16, 64
NUM_EXPERTS = 8
OPTIM = OptimizerConfig(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, warmup_steps=2, min_lr_ratio=0.1,
                        max_grad_norm=0.5)


def tiny_model(device: str = "cpu", impl: str = "loop") -> MoEForCausalLM:
    """2 MoE layers (after one dense layer) of 8 top-2 experts plus a shared expert, hidden 32, decisive weights."""
    torch.manual_seed(0)
    cfg = ModelConfig(family="deepseek_moe", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4, num_experts=NUM_EXPERTS, num_experts_per_tok=2,
                      moe_intermediate_size=16, num_shared_experts=1, first_k_dense_replace=1, aux_loss="seq",
                      aux_loss_coef=0.01)
    model = MoEForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)  # routing far from ties: fp32 summation order must not flip a top-k choice
    model.set_expert_impl(impl)
    return model.to(device)


def starve(model: MoEForCausalLM, experts: range) -> None:
    """Force routing away from ``experts`` in every MoE layer (their router scores are masked before top-k)."""
    for block in model.moe_blocks():
        gate = block.gate
        mask = torch.zeros(NUM_EXPERTS, dtype=torch.bool, device=gate.weight.device)
        mask[list(experts)] = True

        def select(scores: torch.Tensor, gate=gate, mask=mask):
            return torch.topk(scores.masked_fill(mask, -1.0), gate.top_k, dim=-1)

        gate.select = select


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels), each (4, 16). Rows 0 and 3 have fewer targets (-100 tails), so the two ranks' halves
    hold different numbers of target tokens and only a loss normalised by the global count is right."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_ROWS, SEQ), generator=g)
    labels = ids.clone()
    labels[0, 6:] = -100
    labels[3, 12:] = -100
    return ids, labels


def offload(tier: str) -> OffloadConfig:
    """fp32 compute weights on every device, so that GPU runs are compared in fp32 too."""
    return OffloadConfig(tier=tier, gpu_budget_gb=0.01, compute_dtype="fp32")


def train(model: MoEForCausalLM, opt: Any, steps: range, rows: slice = slice(None),
          loss_fn: Optional[Any] = None, norms: Optional[list[float]] = None) -> None:
    """Optimizer steps ``steps`` (0-based, of a ``STEPS``-step schedule) on ``rows`` of each global batch;
    appends each step's global gradient norm to ``norms``."""
    for step in steps:
        ids, labels = (t[rows].to(model.lm_head.weight.device) for t in global_batch(step))
        out = model(ids, labels=labels, return_logits=False)
        loss = out.loss if loss_fn is None else loss_fn(out, {"labels": labels})
        loss.backward()
        norm = opt.clip_grad_norm_(OPTIM.max_grad_norm)
        if norms is not None:
            norms.append(float(norm))
        opt.step(lr_at(OPTIM, step, STEPS))
        opt.zero_grad()


def weights(model: MoEForCausalLM, opt: Any) -> dict[str, torch.Tensor]:
    """Every parameter this process holds: fp32 masters where the optimizer keeps them, else the model's."""
    out = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    out.update({n: t.cpu() for n, t in opt.checkpoint_state().named_master_tensors()})
    return out


# ---------------------------------------------------------------------------------------------- single process
def reference(tier: str, starved: Optional[range] = None, checkpoint_at: Optional[int] = None,
              run_dir: Optional[Path] = None, device: str = "cpu", impl: str = "loop") -> dict[str, Any]:
    """10 steps on the whole global batch in one process; optionally a checkpoint after ``checkpoint_at`` steps.

    Returns {"weights": {name: tensor}, "norms": [global gradient norm of each step]}."""
    from moetrain.training.checkpoint import save_checkpoint

    model = tiny_model(device, impl)
    if starved is not None:
        starve(model, starved)
    opt = build_optimizer(model, OPTIM, offload(tier))
    norms: list[float] = []
    if checkpoint_at is None:
        train(model, opt, range(STEPS), norms=norms)
    else:
        train(model, opt, range(checkpoint_at), norms=norms)
        save_checkpoint(run_dir, checkpoint_at, model, optimizer=opt)
        train(model, opt, range(checkpoint_at, STEPS), norms=norms)
    return {"weights": weights(model, opt), "norms": norms}


def resume_single(ckpt: Path, tier: str) -> dict[str, torch.Tensor]:
    """Load a checkpoint (written by any number of ranks) in one process and finish the 10 steps."""
    from moetrain.training.checkpoint import load_weights_into
    from moetrain.training.optimizer_state import load_optimizer, read_meta

    model = tiny_model()
    load_weights_into(model, ckpt)
    opt = build_optimizer(model, OPTIM, offload(tier))
    load_optimizer(opt, model, ckpt)
    start = int(read_meta(ckpt)["step_index"])
    train(model, opt, range(start, STEPS))
    return {"weights": weights(model, opt)}


# ---------------------------------------------------------------------------------------------- two ranks
def _run(name: str, tier: str, ep: int, out_dir: Path, starved: Optional[range] = None,
         resume_from: Optional[Path] = None, checkpoint_at: Optional[int] = None, device: str = "cpu",
         impl: str = "loop") -> None:
    from moetrain.training.checkpoint import load_weights_into
    from moetrain.training.optimizer_state import read_meta

    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_model(f"cuda:{rank}" if device == "cuda" else device, impl)
    if starved is not None:
        starve(model, starved)
    start = 0
    if resume_from is not None:
        load_weights_into(model, resume_from)  # the full model, before its experts are split
    runtime = ParallelRuntime(ParallelConfig(expert_parallel=ep))
    opt = runtime.build_optimizer(model, OPTIM, offload(tier))
    if resume_from is not None:
        runtime.load_optimizer(opt, model, resume_from)
        start = int(read_meta(resume_from)["step_index"])
    rows = slice(rank * GLOBAL_ROWS // world, (rank + 1) * GLOBAL_ROWS // world)
    norms: list[float] = []
    if checkpoint_at is not None:
        train(model, opt, range(start, checkpoint_at), rows, runtime.loss_for_backward, norms)
        runtime.save_checkpoint(out_dir / f"{name}_run", checkpoint_at, model, optimizer=opt)
        start = checkpoint_at
    train(model, opt, range(start, STEPS), rows, runtime.loss_for_backward, norms)
    store = getattr(opt.inner, "store", None)
    result = {"weights": weights(model, opt),
              "owned": weights_owned(model, opt), "norms": norms,
              "records": None if store is None else len(store.records),
              "cpu_bytes": None if store is None else store.cpu_bytes}
    torch.save(result, out_dir / f"{name}_rank{rank}.pt")


def weights_owned(model: MoEForCausalLM, opt: Any) -> list[str]:
    store = getattr(opt.inner, "store", None)
    return [] if store is None else sorted(n for rec in store for n in rec.names)


def worker(rank: int, world: int, port: int, out_dir: str, scenarios: list[dict[str, Any]],
           backend: str = "gloo") -> None:
    """``torch.multiprocessing.spawn`` target: every scenario in turn, on one process group (gloo on the CPU,
    NCCL with one GPU per rank)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        for scenario in scenarios:
            _run(out_dir=Path(out_dir), **scenario)
    finally:
        dist.destroy_process_group()
