"""The CPU share's AdamW (``csrc/adamw_cuda_order.c``): the fused CUDA kernel's operations, compiled for the host.

On the CPU it is checked against the same operations written with torch (each fused multiply-add and the square
root through fp64) and against ``torch.optim.AdamW``; on CUDA, bit for bit against
the kernel itself (``tests/gpu/test_adam_cuda_order_cuda.py``).
"""

from __future__ import annotations

import pytest
import torch

from moetrain.offload import adam_cuda_order
from moetrain.offload.adam_cuda_order import BuildError, CudaOrderCpuAdam, bias_corrections
from moetrain.optim import OptimizerConfig

CFG = OptimizerConfig(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 fused multiply-add: the fp32 product is exact in fp64, so one fp64 add and a cast round it (twice,
    which differs from one rounding only on exact fp64 ties: none in these draws)."""
    return (a.double() * b.double() + c.double()).float()


def _kernel_ops(p, g, m, v, *, step: int, lr: float, wd: float, cfg: OptimizerConfig, bc: tuple[float, float]):
    """The fused CUDA AdamW kernel's fp32 operations in its order, with torch ops (new p, m, v)."""
    f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731  (a Python double cast to fp32, as the kernel)
    lr_t, b1, b2, wd_t, eps = f(lr), f(cfg.betas[0]), f(cfg.betas[1]), f(wd), f(cfg.eps)
    bc1, bc2_sqrt = f(bc[0]), f(bc[1])
    p = _fma(-(lr_t * wd_t), p, p)
    m = _fma(b1, m, _fma(-b1, g, g))
    g2 = g * g
    v = _fma(b2, v, _fma(-b2, g2, g2))
    # the square root through fp64 and back is the correctly rounded fp32 one (as on the device and in C), which
    # torch's fp32 CPU kernel is not always: it is an ulp off near ties
    denom = torch.sqrt(v.double()).float() / bc2_sqrt + eps
    return p - ((lr_t / bc1) * m) / denom, m, v


def _state(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen), torch.zeros(n), torch.zeros(n), gen


def test_equals_the_kernels_operations_written_in_torch():
    adam = CudaOrderCpuAdam(CFG)
    p, m, v, gen = _state(100_003)  # odd: the vector loop's tail too
    ref = (p.clone(), m.clone(), v.clone())
    for step in range(1, 6):
        g = torch.randn(p.numel(), generator=gen) * 10.0 ** (step - 3)  # small and large gradients
        lr = 1e-2 / step
        adam.step(p, g, m, v, step=step, lr=lr, weight_decay=0.1)
        bc = bias_corrections(adam.lib, CFG.betas, step)
        ref = _kernel_ops(*ref[:1], g, *ref[1:], step=step, lr=lr, wd=0.1, cfg=CFG, bc=bc)
        for ours, theirs in zip((p, m, v), ref, strict=True):
            assert torch.equal(ours, theirs), f"step {step}: {(ours - theirs).abs().max()}"


def test_is_adamw():
    """Within fp32 rounding of torch.optim.AdamW (another order of the same formula), decay on and off."""
    for wd in (0.1, 0.0):
        p, m, v, gen = _state(4096, seed=1)
        ref = torch.nn.Parameter(p.clone())
        torch_opt = torch.optim.AdamW([ref], lr=CFG.lr, betas=CFG.betas, eps=CFG.eps, weight_decay=wd, foreach=False)
        adam = CudaOrderCpuAdam(CFG)
        for step in range(1, 6):
            g = torch.randn(p.numel(), generator=gen)
            adam.step(p, g, m, v, step=step, lr=CFG.lr, weight_decay=wd)
            ref.grad = g.clone()
            torch_opt.step()
        assert (p - ref.detach()).abs().max() <= 1e-6  # 5 steps of 1e-2 moved p by up to 5e-2
        assert (p - _state(4096, seed=1)[0]).abs().max() > 1e-2


def test_threads_do_not_change_the_bits():
    out = []
    for threads in (1, 2, 3):
        p, m, v, gen = _state(50_000, seed=2)
        adam = CudaOrderCpuAdam(CFG, threads=threads)
        for step in (1, 2):
            adam.step(p, torch.randn(p.numel(), generator=gen), m, v, step=step, lr=1e-3, weight_decay=0.1)
        out.append(p)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_bias_corrections_are_the_fp32_formula():
    lib = CudaOrderCpuAdam(CFG).lib
    b1, b2 = (float(torch.tensor(b, dtype=torch.float32)) for b in (0.9, 0.999))  # the betas as the kernel has them
    for step in (1, 7, 1000):
        bc1, bc2_sqrt = bias_corrections(lib, (0.9, 0.999), step)
        # 1 - pow in fp32: within an ulp of the power (6e-8), whatever the cancellation does to the relative error
        assert abs(bc1 - (1 - b1**step)) <= 1.2e-7 and abs(bc2_sqrt**2 - (1 - b2**step)) <= 1.2e-7
    assert bias_corrections(lib, (0.9, 0.999), 100_000) == (1.0, 1.0)


def test_bad_tensors_are_named():
    adam = CudaOrderCpuAdam(CFG)
    p, m, v, _ = _state(64)
    with pytest.raises(ValueError, match="grad must be a contiguous fp32 host tensor of 64"):
        adam.step(p, torch.zeros(128)[::2], m, v, step=1, lr=1e-3, weight_decay=0.0)
    with pytest.raises(ValueError, match="exp_avg_sq .* torch.bfloat16"):
        adam.step(p, torch.zeros(64), m, v.bfloat16(), step=1, lr=1e-3, weight_decay=0.0)


def test_a_missing_compiler_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    with pytest.raises(BuildError, match=r"(?s)adamw_cuda_order\.c failed: .*no-such-cc.*point CC at one"):
        adam_cuda_order.build()
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-written is left to be loaded later


@pytest.mark.parametrize("kind", ["exact", "deepspeed"])
def test_the_recipe_key_picks_the_cpu_shares_adamw(kind):
    """``model.offload.schedule.cpu_adam`` reaches the CPU share, which steps the experts with it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from offload_harness import OPTIM, batches, tiny_model

    from moetrain.offload import build_optimizer
    from moetrain.offload.adam import CpuAdam
    from moetrain.offload.config import resolve_section

    plan = resolve_section({"placement": {"tier": "cpu"}, "schedule": {"step_on": "cpu", "cpu_adam": kind}})
    model = tiny_model()
    opt = build_optimizer(model, OPTIM, plan)
    assert isinstance(opt.engine.cpu.stepper.cpu_adam, CudaOrderCpuAdam if kind == "exact" else CpuAdam)
    for ids in batches(steps=3):
        model(ids, labels=ids).loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step(OPTIM.lr)
        opt.zero_grad()
    assert opt.telemetry()["offload/experts_stepped_cpu"] > 0
    opt.close()


def test_an_unknown_cpu_adam_is_refused_with_its_key():
    from moetrain.config import ConfigError
    from moetrain.offload.config import resolve_section

    with pytest.raises(ConfigError, match=r"schedule\.cpu_adam='torch': choose one of exact, deepspeed"):
        resolve_section({"schedule": {"cpu_adam": "torch"}})
