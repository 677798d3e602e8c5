"""A recipe's compute-only step: forward and backward with resident bf16 weights and no optimizer.

The front door's speed target is relative to this figure: the same model (the recipe's preset at full
depth, random weights built on the GPU), the same micro-batch (``data.micro_batch_size`` x
``data.seq_len``), the same expert implementation and activation checkpointing, and the same number of
micro-batches an optimizer step (``model.accumulate_grad_batches``). Every parameter is bf16 and resident;
gradients accumulate in bf16; nothing is paged and nothing is stepped. What the offloaded run spends
beyond this is the optimizer's and the paging's.

``--micro-batches K`` times K micro-batches after two warm-up ones and scales to the recipe's
accumulation: K back to back, as a fit runs them (each timed by events on the GPU's clock: ``micro_batch_s`` is their
median), after K more timed one at a time, the host waiting for each (``micro_batch_synced_s``, the figure before
r39). The micro-batches are the rows ``moetrain fit`` trains on in ``moetrain.bench.recipe_run``: the
shipped tiny corpus packed by the recipe's data settings, documents and all (``--data``/``--tokenizer`` for
another file), so attention does the same work in both; ``--random-tokens`` takes random tokens, one causal
document a row, instead (the baseline of runs before r20). ``--profile`` traces two more
micro-batches with ``torch.profiler`` and splits the GPU time by kernel family (GEMMs, grouped GEMMs,
attention, the loss, elementwise and the rest) and the time the GPU sat idle inside the span (launch-
and host-bound gaps).

    python -m moetrain.bench.compute_only --recipe recipes/deepseek-moe-16b.yaml --profile --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch
import yaml

from moetrain import cuda_alloc
from moetrain.bench.recipe_run import TINY_CORPUS
from moetrain.config import ModelConfig
from moetrain.models.random_hf import DEFAULT_TOKENIZER
from moetrain.models.random_init import build_random
from moetrain.models.varlen import batch_spans
from moetrain.training.step_profiler import summarize
from moetrain.training.telemetry import peak_flops, training_flops_per_token


def micro_batches(a: argparse.Namespace, *, micro: int, seq: int, vocab: int) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches of ``micro`` rows of ``seq`` tokens on the GPU, endlessly: the packed rows of ``a.data`` in
    the training order ``moetrain fit`` takes (input_ids, labels, document_ids, position_ids), or random tokens."""
    dev = torch.device("cuda")
    if a.random_tokens:
        gen = torch.Generator(device=dev).manual_seed(0)
        while True:
            ids = torch.randint(0, vocab, (micro, seq), device=dev, generator=gen)
            yield {"input_ids": ids, "labels": ids}
    from moetrain.training.data import TextDataModule

    data = TextDataModule(a.data, a.tokenizer, seq_len=seq, micro_batch_size=micro)
    data.prepare()
    data.setup("fit")
    while True:
        for batch in data.train_dataloader():
            yield {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def main(argv: Optional[list[str]] = None) -> dict:
    cuda_alloc.apply_defaults()  # the allocator settings of `moetrain fit`, before CUDA is touched
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True)
    p.add_argument("--micro-batches", type=int, default=8, help="micro-batches timed (after 2 warm-up ones)")
    p.add_argument("--micro", type=int, default=None, help="rows a micro-batch (default: the recipe's)")
    p.add_argument("--checkpoint-layers", default=None, choices=["true", "false"],
                   help="activation checkpointing (default: the recipe's)")
    p.add_argument("--profile", action="store_true", help="trace two more micro-batches: GPU time by kernel family")
    p.add_argument("--data", default=str(TINY_CORPUS), help="JSONL the rows are packed from (default: the tiny corpus)")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER),
                   help="tokenizer directory for --data (default: the random directory's)")
    p.add_argument("--random-tokens", action="store_true", help="random tokens, one causal document a row")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("compute_only benchmark needs a CUDA device")
    recipe = yaml.safe_load(Path(a.recipe).read_text())
    model_cfg, data_cfg = recipe.get("model") or {}, recipe.get("data") or {}
    cfg = ModelConfig.from_preset(model_cfg["preset"], **(model_cfg.get("config") or {}))
    micro = a.micro or int(data_cfg.get("micro_batch_size", 1))
    seq = int(data_cfg.get("seq_len", 2048))
    accum = int(model_cfg.get("accumulate_grad_batches", 1))
    ckpt = (a.checkpoint_layers == "true") if a.checkpoint_layers else bool(model_cfg.get("activation_checkpointing"))
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    model = build_random(cfg, 0, device=dev).to(torch.bfloat16)
    model.set_expert_impl(model_cfg.get("expert_impl", "auto"))
    model.set_activation_checkpointing(ckpt)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    batches = iter(micro_batches(a, micro=micro, seq=seq, vocab=cfg.vocab_size))

    def micro_batch() -> None:
        batch = next(batches)
        out = model(batch["input_ids"], labels=batch["labels"], document_ids=batch.get("document_ids"),
                    position_ids=batch.get("position_ids"), return_logits=False, spans=batch_spans(batch))
        (out.loss / accum).backward()

    for _ in range(2):
        micro_batch()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    synced = []  # each micro-batch alone: the host waits for it (the figure of runs before r39)
    for _ in range(a.micro_batches):
        t = time.perf_counter()
        micro_batch()
        torch.cuda.synchronize()
        synced.append(time.perf_counter() - t)
    # back to back, as a fit's micro-batches run: each one's time from events on the GPU's clock, no host wait
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(a.micro_batches + 1)]
    marks[0].record()
    for i in range(a.micro_batches):
        micro_batch()
        marks[i + 1].record()
    torch.cuda.synchronize()
    times = [a_.elapsed_time(b_) / 1e3 for a_, b_ in zip(marks, marks[1:], strict=False)]
    per_micro = statistics.median(times)
    step_s = per_micro * accum
    tokens = micro * seq * accum
    peak = peak_flops(dev)
    mfu = training_flops_per_token(cfg) * tokens / step_s / peak if peak else None
    res = {"bench": "compute_only", "recipe": a.recipe, "device": torch.cuda.get_device_name(0),
           "params_B": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
           "micro": micro, "seq": seq, "accum": accum, "activation_checkpointing": ckpt,
           "data": "random tokens" if a.random_tokens else Path(a.data).name,
           "build_s": round(build_s, 1), "micro_batch_s": round(per_micro, 4),
           "micro_batch_times_s": [round(t, 4) for t in times],
           "micro_batch_synced_s": round(statistics.median(synced), 4), "step_s": round(step_s, 3),
           "tokens_per_s": round(tokens / step_s, 1), "mfu": None if mfu is None else round(mfu, 4),
           "gpu_peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                micro_batch()
            torch.cuda.synchronize()
        res["profile_2_micro_batches"] = {"micro_batches": 2, **summarize(prof, top=25)}
        top = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        print(top, flush=True)
    print("RESULT " + json.dumps(res), flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        name = Path(a.recipe).stem
        (Path(a.out) / f"compute_only_{name}.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
