"""The CPU share's AdamW in the rounding of torch's fused CUDA kernel: the CPU share steps what the GPU would.

The reference every expert tier is compared with is ``torch.optim.AdamW(fused=True)`` on CUDA. DeepSpeed's
vectorised CPU Adam computes the same formula in another order (an ulp of the master apart a step), which
training feedback grows: 2.1e-6 after 10 fp32 steps of the 4-layer test, and 3.5e-2 after 20 steps under bf16
autocast, where a flipped bf16 rounding of a weight changes the routing. ``csrc/adamw_cuda_order.c`` does the
kernel's fp32 operations in its order, with its fused multiply-adds, and takes the bias corrections from the
device, so every element gets the kernel's bits (run r26: 0 of 4M elements apart after a step where DeepSpeed's
kernel had 97 k).

The C file is compiled once per environment with the system C compiler (a second or two, no torch headers),
cached beside DeepSpeed's ops (:mod:`moetrain.offload.build_cache`), and called through
ctypes, which lets go of the GIL for the call: the Python thread that queues backward keeps running while the
CPU share steps.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch

from moetrain.offload.build_cache import use_environment_build_cache
from moetrain.optim import OptimizerConfig

SOURCE = Path(__file__).with_name("csrc") / "adamw_cuda_order.c"
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
"""``-ffp-contract=off``: no multiply-add the kernel rounds separately may be fused; ``-fno-math-errno`` lets
``sqrtf`` vectorise (it sets no errno on these non-negative inputs either way)."""


class BuildError(RuntimeError):
    """The C compiler failed on the CPU share's AdamW (its message names the compiler and the source)."""


def compiler() -> str:
    return os.environ.get("CC", "cc")


def build(defines: tuple[str, ...] = ()) -> Path:
    """Compile :data:`SOURCE` into the environment's build cache (once per source, flags and defines); the path."""
    use_environment_build_cache()
    flags = FLAGS + tuple(f"-D{d}" for d in defines)
    key = hashlib.sha1(SOURCE.read_bytes() + " ".join((compiler(),) + flags).encode()).hexdigest()[:12]
    folder = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "moetrain_adamw_cuda_order"
    out = folder / f"adamw_cuda_order-{key}.so"
    if out.is_file():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    cmd = [compiler(), *flags, str(SOURCE), "-o", tmp, "-lm"]
    try:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
            failure = f"exit {done.returncode}:\n{done.stderr.strip()}" if done.returncode != 0 else ""
        except OSError as err:  # no such compiler
            failure = str(err)
        if failure:
            raise BuildError(f"building the CPU share's AdamW from {SOURCE} failed: `{' '.join(cmd)}`: {failure}\n"
                             "Install a C compiler with OpenMP (gcc), or point CC at one.")
        os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@cache
def load(defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The compiled library with its argument types declared (Python floats become C floats: round to nearest,
    as the kernel's ``static_cast<float>`` of its double arguments)."""
    lib = ctypes.CDLL(str(build(defines)))
    f, p, i64 = ctypes.c_float, ctypes.c_void_p, ctypes.c_int64
    lib.adamw_cuda_order.argtypes = [p, p, p, p, i64, f, f, f, f, f, f, f, ctypes.c_int]
    lib.adamw_cuda_order.restype = None
    lib.adamw_bias_corrections.argtypes = [f, f, f, ctypes.POINTER(f)]
    lib.adamw_bias_corrections.restype = None
    return lib


def bias_corrections(lib: ctypes.CDLL, betas: tuple[float, float], step: int) -> tuple[float, float]:
    """``(1 - beta1**step, sqrt(1 - beta2**step))`` in fp32 through the host C library's ``powf``: the kernel's
    formula, but not always its bits (the device's ``powf`` is another implementation: run r26 found 1 step in
    100 000 apart for beta2 0.95 and 49 for 0.999), so on CUDA :func:`device_bias_corrections` gives them."""
    out = (ctypes.c_float * 2)()
    lib.adamw_bias_corrections(*betas, float(step), out)
    return out[0], out[1]


DEVICE_TABLE_STEPS = 1 << 18
"""Steps whose bias corrections a CUDA CPU share forms on the device at start-up (2 MiB of host memory); the
table doubles, on the device again, when training passes its end."""


def device_bias_corrections(betas: tuple[float, float], device: torch.device, *, first: int,
                            count: int) -> torch.Tensor:
    """((count, 2) fp32, host) the bias corrections of steps ``first .. first + count - 1`` formed on ``device`` as
    the fused kernel forms them: ``torch.pow`` of fp32 CUDA tensors calls the device's ``powf`` that the kernel
    calls. One host sync (at start-up, then once each time the table doubles)."""
    steps = torch.arange(first, first + count, dtype=torch.float32, device=device)
    bc1 = 1 - torch.pow(torch.full_like(steps, betas[0]), steps)
    bc2_sqrt = torch.sqrt(1 - torch.pow(torch.full_like(steps, betas[1]), steps))
    return torch.stack([bc1, bc2_sqrt], 1).cpu()


def _check(name: str, t: torch.Tensor, numel: int) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or t.numel() != numel:
        raise ValueError(f"CPU AdamW: {name} must be a contiguous fp32 host tensor of {numel} elements, got "
                         f"{tuple(t.shape)} {t.dtype} on {t.device} (contiguous: {t.is_contiguous()})")


class CudaOrderCpuAdam:
    """AdamW stepping flat fp32 host tensors in place, bit for bit as torch's fused CUDA AdamW would.

    Args:
        cfg: betas and eps (learning rate and weight decay come with each step).
        device: the compute device; on CUDA the bias corrections come from it (:func:`device_bias_corrections`),
            elsewhere from the host's ``powf``.
        threads: OpenMP threads per call (default: torch's intra-op thread count).
        defines: preprocessor defines for the C file (probes only).
    """

    def __init__(self, cfg: OptimizerConfig, *, device: torch.device | str | None = None, threads: int | None = None,
                 defines: tuple[str, ...] = ()) -> None:
        self.cfg = cfg
        self.lib = load(tuple(defines))
        self.threads = threads or torch.get_num_threads()
        self.device = torch.device(device) if device is not None else None
        self.table: torch.Tensor | None = None
        if self.device is not None and self.device.type == "cuda":
            self.table = device_bias_corrections(cfg.betas, self.device, first=1, count=DEVICE_TABLE_STEPS)

    def bias_corrections(self, step: int) -> tuple[float, float]:
        """``(1 - beta1**step, sqrt(1 - beta2**step))`` as the fused kernel on this device forms them."""
        if self.table is None:
            return bias_corrections(self.lib, self.cfg.betas, step)
        while step > len(self.table):
            more = device_bias_corrections(self.cfg.betas, self.device, first=len(self.table) + 1,
                                           count=len(self.table))
            self.table = torch.cat([self.table, more])
        bc1, bc2_sqrt = self.table[step - 1].tolist()
        return bc1, bc2_sqrt

    def step(self, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
             *, step: int, lr: float, weight_decay: float) -> None:
        """One AdamW update of the flat fp32 host tensors (``step`` is the step number after it)."""
        n = param.numel()
        for name, t in (("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            _check(name, t, n)
        beta1, beta2 = self.cfg.betas
        bc1, bc2_sqrt = self.bias_corrections(step)
        self.lib.adamw_cuda_order(param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), n,
                                  lr, beta1, beta2, weight_decay, self.cfg.eps, bc1, bc2_sqrt, self.threads)


if __name__ == "__main__":  # build ahead of time: python -m moetrain.offload.adam_cuda_order
    print(f"built {build()}", file=sys.stderr)
