"""The CPU share's AdamW (``moetrain.offload.adam_cuda_order``) against the kernel it follows: torch's fused CUDA
AdamW, the kernel of the resident reference, bit for bit.

Run on the GPU machine: ``python -m pytest -q tests/gpu/test_adam_cuda_order_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from moetrain.offload.adam import fused_adamw, step_tensors
from moetrain.offload.adam_cuda_order import (
    DEVICE_TABLE_STEPS,
    CudaOrderCpuAdam,
    bias_corrections,
    device_bias_corrections,
)
from moetrain.optim import OptimizerConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BETAS = [(0.9, 0.95), (0.9, 0.999)]  # the recipes' and torch's default


def _cuda_step(p, g, m, v, *, step: int, lr: float, wd: float, cfg: OptimizerConfig) -> None:
    """The reference's kernel (what ``torch.optim.AdamW(fused=True)`` calls) on CUDA tensors, in place."""
    fused_adamw([p], [g], [m], [v], steps=step_tensors([step], p.device), lr=lr, weight_decay=wd, cfg=cfg)


def _host_powf_misses(betas: tuple[float, float], last: int = 100_000) -> list[int]:
    """Steps up to ``last`` whose bias corrections by the host's powf differ from the device's."""
    lib = CudaOrderCpuAdam(OptimizerConfig(betas=betas)).lib
    device = device_bias_corrections(betas, torch.device("cuda"), first=1, count=last)
    host = torch.tensor([bias_corrections(lib, betas, s) for s in range(1, last + 1)], dtype=torch.float32)
    return ((host != device).any(1).nonzero().flatten() + 1).tolist()


@pytest.mark.parametrize("betas", BETAS)
@pytest.mark.parametrize("wd", [0.1, 0.0])
def test_steps_are_the_fused_cuda_kernels_bits(betas, wd):
    """Ten consecutive steps, then single steps far into training: where the host's powf misses the device's
    bias corrections (run r26: step 6 of beta2 0.95, 49 steps to 100 000 of 0.999), and past the device table."""
    cfg = OptimizerConfig(lr=1e-2, betas=betas, eps=1e-8, weight_decay=wd)
    adam = CudaOrderCpuAdam(cfg, device="cuda")
    misses = _host_powf_misses(betas)
    print(f"betas {betas}: the host's powf misses the device's bias corrections at {len(misses)} of 100 000 steps")
    gen = torch.Generator().manual_seed(0)
    n = (1 << 20) + 3
    host = [torch.randn(n, generator=gen), torch.zeros(n), torch.zeros(n)]
    dev = [t.cuda() for t in host]
    for step in list(range(1, 11)) + misses[:3] + [1000, 99999, DEVICE_TABLE_STEPS + 5]:
        g = torch.randn(n, generator=gen) * 10.0 ** (step % 5 - 3)
        lr = 1e-2 / (1 + step % 3)
        adam.step(host[0], g, host[1], host[2], step=step, lr=lr, weight_decay=wd)
        _cuda_step(*dev[:1], g.cuda(), *dev[1:], step=step, lr=lr, wd=wd, cfg=cfg)
        for name, ours, theirs in zip(("param", "exp_avg", "exp_avg_sq"), host, dev, strict=True):
            theirs = theirs.cpu()
            differ = int((ours != theirs).sum())
            assert differ == 0, f"step {step}: {name} differs in {differ} of {n} (max {(ours - theirs).abs().max()})"
