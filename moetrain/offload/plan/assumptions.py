"""The numbers the planner assumes rather than measures: reserves no tensor accounts for, the sustained compute
rate, the NVMe swap's rate, and the bytes a parameter takes while the model loads. Each says where it comes
from."""

from __future__ import annotations

GiB = 2**30
DEFAULT_COMPUTE_TFLOPS = 190.0
"""Sustained bf16 training throughput of ``moetrain fit``'s forward and backward at 4 096 tokens a micro-batch:
the full-depth DeepSeek-MoE-16B recipe (2 x 2048 tokens, 32 accumulated, fp32 dense master under bf16 autocast,
resident bf16 expert weights) spent 11.71 s of its 14.07 s step outside the optimizer step on an H200,
193 TFLOP/s (benchmarks/README.md, run p3). The step is host-bound at that size: smaller micro-batches are
slower a token and larger ones faster (:func:`sustained_tflops`)."""
HOST_BOUND_SHARE = 0.60
"""The share of :data:`DEFAULT_COMPUTE_TFLOPS` a 2 048-token micro-batch reaches: the compute-only step of the same
model (resident bf16 weights, no optimizer) reached ``mfu`` 0.166 at 1 x 2048 tokens and 0.275 at 2 x 2048 on an H200
(runs p1 and p2), the launches of one micro-batch costing about the same host time at either size."""
LARGE_MICRO_GAIN = 1.2
"""How much faster the forward and backward run a token at 8 192 tokens a micro-batch than at 4 096: ``moetrain fit``
of the DeepSeek-MoE-16B recipe as written (fp32 master, int8 moments) spent 9.7-10.0 s of its last two steps
outside the optimizer step at 32 micro-batches of 2 x 2048 tokens (benchmarks/README.md, run r3) and 8.0-8.6 s at
16 of 4 x 2048 (run r9), on an H200: the host's work a micro-batch (Lightning, the engine's hooks, some 7 000
kernel launches) stays about the same while the GPU's doubles. Not measured beyond 8 192 tokens: held there."""
BF16_STREAM_GAIN = 1.08
"""How much faster the forward and backward run with a bf16 residual stream (``model.residual_dtype: bf16``) than
with the fp32 stream of fp32 weights under bf16 autocast: the DeepSeek-MoE-16B recipe with a ``bf16_sr`` master
at 16 micro-batches of 4 x 2048 tokens spent 8.04 s of its step outside the optimizer step with the fp32 stream
(benchmarks/README.md, run r12) and 7.40 s with the bf16 one (run r13), the same code otherwise: the stream's
casts and fp32 elementwise work are gone. Since the fused norms (which take a bf16 stream only) the gain depends on
the shape: forward and backward of the OLMoE-1B-7B recipe 4.08 s with fp32, 2.67 s with bf16 (1.53x; runs r47, r50);
Qwen1.5-MoE-A2.7B about 8.9 s and 8.2 s (1.08x), DeepSeek-V2-Lite 10.9 s and 9.9 s (1.10x; runs r46, r50). The rate
it multiplies was calibrated on bf16 streams (:data:`ATTENTION_KERNEL_GAIN`), so an fp32 stream is planned up to a
third too fast; every shipped recipe of a real model runs a bf16 stream."""


FUSED_KERNEL_GAIN = 1.17
"""How much faster the forward and backward run since the fused SwiGLU and MoE-combine kernels and the packed rows'
variable-length attention: the DeepSeek-MoE-16B recipe with a ``bf16_sr`` master at 16 micro-batches of 4 x 2048
tokens spent 7.44 s of its step outside the optimizer step before them (benchmarks/README.md, run r15) and 6.33 s
with them (run r20), on an H200. Measured at 8 192 tokens a micro-batch only; applied at every size."""
ATTENTION_KERNEL_GAIN = 1.24
"""How much faster again since the sync-free forward, the fused RMSNorm and rotary kernels and the tokens-major
attention, for models whose attention takes them (not multi-head latent attention: MLA's rotary slices and value
width take the eager rotary and the dense mask). Run r45 on an H200: the DeepSeek-MoE-16B recipe as written, 6.56 s a
step with 5.63 s of forward and backward at 8 192 tokens a micro-batch (395 TFLOP/s); Qwen3-30B-A3B as written, 2.50
s at 32 768 under activation checkpointing (352 TFLOP/s, the recomputed forward counted). 1.24 puts the plan 10% over
the first and 2% under the second; Qwen1.5-MoE-A2.7B at 4 096 tokens (run r46) 16% under. DeepSeek-V2-Lite (MLA) ran
12.45 s (r46), as in r6 (12.1 s): none of these kernels reaches it."""


def sustained_tflops(micro_batch_tokens: int, *, latent_attention: bool = False) -> float:
    """TFLOP/s the step's forward and backward sustain at ``micro_batch_tokens`` tokens a micro-batch:
    :data:`DEFAULT_COMPUTE_TFLOPS` at 4 096 tokens, :data:`HOST_BOUND_SHARE` of it at 2 048 and below,
    :data:`LARGE_MICRO_GAIN` times it at 8 192 and above, linear between; all times :data:`FUSED_KERNEL_GAIN`, and
    :data:`ATTENTION_KERNEL_GAIN` but for multi-head ``latent_attention``."""
    t = micro_batch_tokens
    if t <= 4096:
        share = HOST_BOUND_SHARE + (1.0 - HOST_BOUND_SHARE) * max(0.0, (t - 2048) / 2048)
    else:
        share = 1.0 + (LARGE_MICRO_GAIN - 1.0) * min(1.0, (t - 4096) / 4096)
    attention = 1.0 if latent_attention else ATTENTION_KERNEL_GAIN
    return DEFAULT_COMPUTE_TFLOPS * share * FUSED_KERNEL_GAIN * attention


DEFAULT_NVME_GBPS = 3.0
"""Bytes per second (GB/s) the NVMe swap moves for the step's reads and writes together, assumed: no run with an
NVMe swap has measured it on the GPU machines yet (benchmarks/README.md). One PCIe 4.0 x4 NVMe drive's data sheet
gives about 7 GB/s of sequential reads and 4-5 GB/s of sequential writes, each measured alone; the swap mixes the
two on one drive (a record read for its step, the stepped record written back), and sustained writes fall below
the data sheet once the drive's write cache is full, so a conservative 3 GB/s for both together is taken.
``moetrain plan --nvme_gbps`` plans another drive (a RAID of several adds their rates)."""
LOAD_BYTES_PER_PARAM = 4
"""Bytes per parameter built in fp32 at load: the dense part always; the routed experts too without an offload tier,
and under a small random initialisation (built in fp32 on the CPU; the store takes their masters and casts their
compute weights only afterwards). With ``init_from``, or a large random initialisation, and a tier the experts are
built at their compute-weight bytes instead and their masters stream into the tier (training/model_build.py,
offload/staged_init.py)."""
GPU_RESERVE = 2 * GiB
"""CUDA context, cuBLAS workspaces and the caching allocator's fragmentation: not in any tensor counted here."""
HOST_RESERVE = 8 * GiB
"""The OS, the Python process with torch and its CUDA context, data-loader workers, the metrics logger and the CPU
step's pinned chunk buffers: host memory the expert state cannot have. Measured during ``moetrain fit`` of the
DeepSeek-MoE-16B recipe (bf16_sr) on an H200 host (benchmarks/README.md, run r2): the process's peak resident memory
was 6.1 GiB beyond the 56.1 GiB pinned store, the machine's used memory 3.9 GiB beyond it. The 15-18 GiB of runs m2
and m3 included Lightning's teardown copying the model into host memory (fixed: ``MoETrainingModule.cpu``)."""
