"""Time building an expert store (pinning its host slab, filling it) for a preset cut to a few layers and experts.

Usage: ``python scripts/bench_store_fill.py [--preset olmoe-1b-7b] [--layers 2] [--experts 16] [--device cpu]
[--formats fp32/fp32,bf16_sr/int8]``. The model is built with random weights on ``--device`` (a GPU fills the store
through the GPU and pins the slab); the store prints its own progress lines, and this prints one summary line per
format: records, GiB of state, seconds pinning and filling.
"""

from __future__ import annotations

import argparse
import time

import torch

from moetrain.config import ModelConfig
from moetrain.models.random_init import build_random
from moetrain.offload.config import OffloadConfig
from moetrain.offload.store import ExpertStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="olmoe-1b-7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--formats", default="fp32/fp32,bf16_sr/int8,bf16_kahan/bf16")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    device = torch.device(args.device)
    config = ModelConfig.from_preset(args.preset, num_hidden_layers=args.layers, num_experts=args.experts,
                                     vocab_size=1024)  # the embeddings play no part in the store
    model = build_random(config, seed=0, device=device, announce=True)
    for spec in args.formats.split(","):
        master, moments = spec.split("/")
        cfg = OffloadConfig(tier="cpu", master=master, moments=moments)
        for _ in range(args.repeat):
            start = time.perf_counter()
            store = ExpertStore(model, cfg, pin=device.type == "cuda", progress=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            total = time.perf_counter() - start
            gib = store.cpu_bytes / 2**30
            print(f"{master}/{moments}: {len(store.records)} records, {gib:.2f} GiB; pinning "
                  f"{store.pin_seconds:.2f} s, fill {total - store.pin_seconds:.2f} s, store built in {total:.2f} s",
                  flush=True)
            del store


if __name__ == "__main__":
    main()
