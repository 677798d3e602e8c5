"""The sparse expert optimizer: dense parameters with torch AdamW, routed experts paged and stepped.

Its parts live in their own modules (``offload/README.md`` draws them); this module keeps the names callers
import: :class:`ExpertOffloadOptimizer` is the :class:`~moetrain.offload.composite.CompositeOptimizer` that
:func:`~moetrain.offload.build.build_offload_optimizer` assembles.

One optimizer step, in order (GPU; on the CPU the streams collapse into one and the logic is the same)::

    forward   sink.routed(layer, routing): counts[layer] += routing.counts  (device, no sync)
              trace.record(): counts -> pinned host, non_blocking + event
              look-ahead: next router on this input -> predicted set         (device counters)
    backward  router grad of layer i accumulated -> trace.poll(i) -> swapper.prefetch(GPU share of i)
              (page-ins ride in_stream under the backward of layers i-1..0)
    clip      global norm over every .grad (dense + experts), coef stays a device tensor;
              dense grads *= coef, experts get grad_scale = 1/coef inside the fused kernel
    step      host reads the union of counts once  ─────────── the one sync of the step
              dense: torch AdamW (fused on CUDA)
              for layer L..0, chunks of num_slots/2 experts:
                  acquire(chunk)  (hits, or H2D on in_stream; compute waits on per-slot events)
                  prefetch(next chunk)                      ← overlaps the fused step below
                  _fused_adamw_ over the chunk; new weights -> model params (bf16 cast on GPU)
                  release(chunk): D2H on out_stream after an event  ← runs under the next chunk,
                                                                       and under the next forward
              step_on cpu/auto: the CPU share is stepped in host memory by the fused CUDA AdamW's operations
              (gradients down, weights up, pipelined: :mod:`moetrain.offload.cpu_step`), in a thread
              beside the GPU share; the compute stream waits for its uploads before the next forward.

When steps wait for the end of backward: clipping by the global norm over all parameters needs every
gradient before any update, so with ``max_grad_norm > 0`` an exact step cannot start earlier; what
hides under backward is the page-in of state (unchanged until its step) and, under the next forward,
the page-out. Without clipping (``max_grad_norm == 0``) a layer's update depends on its own gradients
only, so when the training loop tells the engine the last micro-batch and the step's learning rate
(``begin_micro_batch(index, count, lr)``; the rule lives in :mod:`moetrain.offload.schedule`), the
backward hook of layer i steps layer i as soon as its gradients are final (one host read of that
layer's counts), under the backward of layers i-1..0, frees its GPU-path expert gradients (their squared
norm is kept for the reported grad norm) and prefetches layer i-1; ``step`` then does the dense parameters
and whatever was not stepped yet.

Semantics: ``idle_experts: skip`` is torch AdamW with ``grad = None`` for experts that got no tokens.
``idle_experts: dense`` keeps the learning rate of every step; when an idle expert is next routed (the
routing sink sees it before the experts run) or when state is exported, the zero-gradient AdamW steps it
missed are replayed with the same kernel and each step's learning rate, so it equals a dense AdamW
stepping zero gradients. The replay needs the routed set on the host, so that mode reads the counts
once per MoE layer and micro-batch: the price of its exactness.

Compute weights stay resident by default (the model's own expert parameters). Their dtype is
``compute_dtype`` (bf16 on CUDA by default): the fp32 master lives in the store only, the experts' packed
(E, ...) weight tensors are rebuilt in bf16 once at construction, and every later write (new weights
after a step, a state load) copies into those packed views in place, so the grouped GEMM never repacks
or casts them. Their gradients are then bf16 too and are upcast chunk by chunk right before the fused
AdamW kernel. With ``resident_weights: no`` the compute weights live in host memory instead and are paged
in per layer and active expert (:mod:`moetrain.offload.weight_pager`); every write of new weights goes
to the pager's host rows, and the gradients stay on the device as before.
"""

from __future__ import annotations

from moetrain.offload.build import build_offload_optimizer
from moetrain.offload.composite import CompositeOptimizer
from moetrain.offload.compute_weights import cast_experts, compute_dtype

ExpertOffloadOptimizer = CompositeOptimizer  # the name benchmarks and tests know the offload optimizer by

__all__ = ["ExpertOffloadOptimizer", "build_offload_optimizer", "cast_experts", "compute_dtype"]
