"""The AdamW arithmetic of the expert optimizer: the device step and DeepSpeed's CPU step (``cpu_adam: deepspeed``).

All follow ``torch.optim.AdamW`` (decoupled weight decay ``p *= 1 - lr * wd``, bias-corrected
moments, ``eps`` added after the square root).

* CUDA: ``torch._fused_adamw_``, the kernel that the reference (``DenseAdamW``, ``fused=True`` on
  CUDA) runs too. Gradient clipping reaches it as ``grad_scale``: the kernel divides each gradient by
  it, so ``1 / clip_coef`` (a device tensor) clips without a host sync or an extra pass over the grads.
* CPU (the device that stands in for a GPU in CI): ``torch._fused_adamw_`` exists there too, but the
  reference on the CPU is torch's single-tensor loop, and the fused kernel differs from it by a few
  ulps a step, which 30 steps of routing feedback grow past 1e-6. So the CPU uses the very ops of that
  loop (:func:`reference_adamw`), with clipping as the reference's ``grad *= coef``: bit-identical.
"""

from __future__ import annotations

from typing import Optional

import torch

from moetrain.offload.ops import load_cpu_adam
from moetrain.optim import OptimizerConfig


def fused_adamw(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], *, steps: list[torch.Tensor], lr: float, weight_decay: float,
                cfg: OptimizerConfig, grad_scale: Optional[torch.Tensor] = None) -> None:
    """One AdamW step over fp32 tensors in place.

    ``steps[i]`` is the step number *after* this update (a 0-d fp32 tensor on the params' device; the
    kernel reads it and does not increment it). ``grads`` must match ``params`` in dtype; they may be
    overwritten (unscaled by ``grad_scale``).
    """
    if not params:
        return
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=cfg.betas[0],
                        beta2=cfg.betas[1], weight_decay=weight_decay, eps=cfg.eps, amsgrad=False, maximize=False,
                        grad_scale=grad_scale, found_inf=None)


def reference_adamw(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                    exp_avg_sqs: list[torch.Tensor], *, steps: list[int], lr: float, weight_decay: float,
                    cfg: OptimizerConfig, clip_coef: Optional[torch.Tensor] = None) -> None:
    """The ops of ``torch.optim.adam._single_tensor_adam`` (decoupled decay), in the same order.

    ``steps[i]`` is the step number after this update; ``clip_coef`` multiplies the gradients first,
    as :func:`moetrain.optim.clip_` does for the reference.
    """
    beta1, beta2 = cfg.betas
    for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        if clip_coef is not None:
            grad = grad * clip_coef.to(grad.device, grad.dtype)
        param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** float(step)
        bias_correction2 = 1 - beta2 ** float(step)
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(cfg.eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


def adamw(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
          exp_avg_sqs: list[torch.Tensor], *, steps: list[int], lr: float, weight_decay: float, cfg: OptimizerConfig,
          clip_coef: Optional[torch.Tensor] = None, grad_scale: Optional[torch.Tensor] = None) -> None:
    """One AdamW step in place: fused on CUDA (``grad_scale`` = 1/coef), the reference loop elsewhere.

    ``params`` and moments are fp32; ``grads`` may be bf16 (compute-dtype gradients), upcast here per
    call, i.e. one chunk of experts at a time, so the fp32 copy never exceeds a chunk.
    """
    if not params:
        return
    device = params[0].device
    grads = [g if g.dtype == torch.float32 else g.float() for g in grads]  # bf16 compute grads, fp32 master
    if device.type == "cuda":
        fused_adamw(params, grads, exp_avgs, exp_avg_sqs, steps=step_tensors(steps, device), lr=lr,
                    weight_decay=weight_decay, cfg=cfg,
                    grad_scale=grad_scale)
    else:
        reference_adamw(params, grads, exp_avgs, exp_avg_sqs, steps=steps, lr=lr, weight_decay=weight_decay, cfg=cfg,
                        clip_coef=clip_coef)


def step_tensors(steps: list[int], device: torch.device) -> list[torch.Tensor]:
    """0-d fp32 step tensors on ``device`` built without a host sync (one pinned copy on CUDA)."""
    host = torch.tensor(steps, dtype=torch.float32)
    if device.type == "cuda":
        host = host.pin_memory()
    return list(host.to(device, non_blocking=True).unbind())


class CpuAdam:
    """DeepSpeed's vectorised CPU AdamW (``cpu_adam`` op), stepping fp32 tensors in host memory in place: the CPU
    share's kernel with ``model.offload.schedule.cpu_adam: deepspeed`` (the default is
    :mod:`moetrain.offload.adam_cuda_order`, the bits of torch's fused CUDA AdamW).

    The op is JIT-built on first use (a few minutes on 2 cores; cached per environment, see
    :mod:`moetrain.offload.ops`).
    """

    _next_id = 10_000  # away from DeepSpeedCPUAdam's own counter

    def __init__(self, cfg: OptimizerConfig) -> None:
        self.cfg = cfg
        self.op = load_cpu_adam()
        self.opt_id = CpuAdam._next_id
        CpuAdam._next_id += 1
        self.op.create_adam(self.opt_id, cfg.lr, cfg.betas[0], cfg.betas[1], cfg.eps, cfg.weight_decay, True, False)

    def step(self, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
             *, step: int, lr: float, weight_decay: float) -> None:
        """One AdamW update of the flat fp32 host tensors (``step`` is the step number after it)."""
        self.op.adam_update(self.opt_id, step, lr, self.cfg.betas[0], self.cfg.betas[1], self.cfg.eps, weight_decay,
                            True, param, grad, exp_avg, exp_avg_sq)

    def __del__(self) -> None:
        op = getattr(self, "op", None)
        if op is not None:
            op.destroy_adam(self.opt_id)
