"""The numbers the planner assumes rather than measures: reserves no tensor accounts for, the sustained compute
rate, the NVMe swap's rate, and the bytes a parameter takes while the model loads. Each says where it comes
from."""

from __future__ import annotations

GiB = 2**30
DEFAULT_COMPUTE_TFLOPS = 110.0
"""Sustained bf16 training throughput assumed for the compute estimate: what the full-depth DeepSeek-MoE-16B
reaches with resident weights and no optimizer at 1 x 2048 tokens a micro-batch on an H200 (108 TFLOP/s, ``mfu``
0.109; 2 x 2048: 167; 4 x 2048 with activation checkpointing: 208; benchmarks/README.md, runs m2 and m3).
Small per-expert GEMMs, one gradient accumulation per expert parameter and host-bound launches keep it far below
the card's peak."""
DEFAULT_NVME_GBPS = 3.0
"""Bytes per second (GB/s) the NVMe swap moves for the step's reads and writes together, assumed: no run with an
NVMe swap has measured it on the GPU machines yet (benchmarks/README.md). One PCIe 4.0 x4 NVMe drive's data sheet
gives about 7 GB/s of sequential reads and 4-5 GB/s of sequential writes, each measured alone; the swap mixes the
two on one drive (a record read for its step, the stepped record written back), and sustained writes fall below
the data sheet once the drive's write cache is full, so a conservative 3 GB/s for both together is taken.
``moetrain plan --nvme_gbps`` plans another drive (a RAID of several adds their rates)."""
LOAD_BYTES_PER_PARAM = 4
"""Bytes per parameter built in fp32 at load: the dense part always; the routed experts too under random
initialisation or ``init_from`` without an offload tier (the store takes their masters and casts their compute
weights only afterwards). With ``init_from`` and a tier the experts are built at their compute-weight bytes
instead and their masters stream into the tier (training/module.py ``_build_model``, offload/staged_init.py)."""
GPU_RESERVE = 2 * GiB
"""CUDA context, cuBLAS workspaces and the caching allocator's fragmentation: not in any tensor counted here."""
HOST_RESERVE = 18 * GiB
"""The OS, the Python process with torch and its CUDA context, data-loader workers, the metrics logger and the CPU
step's pinned chunk buffers: host memory the expert state cannot have. Measured as the machine's used memory
beyond the pinned store during ``moetrain fit`` on an H200 host: 18.0 GiB for OLMoE-1B-7B, 15.1 GiB for
Qwen3-30B-A3B when the OOM killer stopped it (benchmarks/README.md, runs m2 and m3)."""
