"""The numbers the planner assumes rather than measures: reserves no tensor accounts for, the sustained compute
rate, and the bytes a parameter takes while the model loads. Each says where it comes from."""

from __future__ import annotations

GiB = 2**30
DEFAULT_COMPUTE_TFLOPS = 400.0
"""Sustained bf16 training throughput assumed for the compute estimate (about 40% of an H100's peak)."""
LOAD_BYTES_PER_PARAM = 4
"""Bytes per parameter built in fp32 at load: the dense part always; the routed experts too under random
initialisation or ``init_from`` without an offload tier (the store takes their masters and casts their compute
weights only afterwards). With ``init_from`` and a tier the experts are built at their compute-weight bytes
instead and their masters stream into the tier (training/module.py ``_build_model``, offload/staged_init.py)."""
GPU_RESERVE = 2 * GiB
"""CUDA context, cuBLAS workspaces and the caching allocator's fragmentation: not in any tensor counted here."""
HOST_RESERVE = 8 * GiB
"""The OS, the Python process with torch and its CUDA context, data-loader workers and the CPU step's
pinned chunk buffers: host memory the expert state cannot have."""
