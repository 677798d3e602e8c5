"""Pinned host<->device bandwidth of this machine: one direction at a time and both at once.

    python -m moetrain.bench.link --out DIR     # writes link.json

The offload targets are stated against these figures measured in the same command.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def measure(nbytes: int = 512 << 20, reps: int = 8) -> dict[str, float]:
    """GB/s for host-to-device, device-to-host and both directions together (pinned buffers)."""
    dev = torch.device("cuda")
    h1 = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    h2 = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d1 = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    d2 = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    up, down = torch.cuda.Stream(), torch.cuda.Stream()

    def issue(h2d: bool, d2h: bool) -> None:
        if h2d:
            with torch.cuda.stream(up):
                d1.copy_(h1, non_blocking=True)
        if d2h:
            with torch.cuda.stream(down):
                h2.copy_(d2, non_blocking=True)

    def run(h2d: bool, d2h: bool) -> float:
        for _ in range(2):  # warm-up
            issue(h2d, d2h)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            issue(h2d, d2h)
        torch.cuda.synchronize()
        return nbytes * reps * (int(h2d) + int(d2h)) / (time.perf_counter() - t0) / 1e9

    return {"h2d_GBps": round(run(True, False), 1), "d2h_GBps": round(run(False, True), 1),
            "bidir_total_GBps": round(run(True, True), 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    res = {"bench": "link", "device": torch.cuda.get_device_name(0), **measure()}
    print("RESULT " + json.dumps(res), flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "link.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
