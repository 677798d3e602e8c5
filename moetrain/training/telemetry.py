"""Numbers and pictures derived from a training step: MFU, GPU memory, routing entropy, expert-load heatmaps.

MFU (model FLOPs utilisation) counts the matrix-multiply FLOPs that a token needs, ``6 x active
parameters`` (forward 2, backward 4; attention's score FLOPs are left out, as in the PaLM
definition at short context), against the device's peak dense bf16 rate. Routed experts count
only the ``k`` a token visits. The CPU has no peak in the table, so MFU is reported on GPUs only
(or where ``metrics.peak_tflops`` is set).

Routing entropy is the entropy of each MoE layer's expert load (tokens per expert, over the logged
window) divided by ``log E``: 1.0 is a perfectly balanced layer, 0.0 one that sends every token to
one expert.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from moetrain.config import ModelConfig

# peak dense bf16 tensor-core rates, FLOP/s (vendor data sheets, without sparsity)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                   "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12}


def training_flops_per_token(config: ModelConfig) -> float:
    """``6 x`` the parameters one token passes through: dense ones plus ``k`` routed experts per MoE layer."""
    from moetrain.offload.plan import count_parameters

    dense, _, per_expert = count_parameters(config)
    return 6.0 * (dense + len(config.moe_layers) * config.num_experts_per_tok * per_expert)


def peak_flops(device: Optional[torch.device] = None) -> Optional[float]:
    """Peak dense bf16 FLOP/s of the current CUDA device, or None (CPU, or a GPU not in the table)."""
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def gpu_memory(device: Optional[torch.device] = None) -> dict[str, float]:
    """Allocated, peak-allocated and reserved GPU memory in GiB (empty on the CPU), the device's used memory as the
    driver counts it (``gpu/device_used_gib``: what nvidia-smi shows, beyond PyTorch's reserve the CUDA context and
    libraries' own allocations), and the caching allocator's
    retries so far: each is a failed ``cudaMalloc`` after which it freed its cached blocks (a device-wide sync) and
    tried again. A run whose count grows from step to step is slowed by memory pressure (a smaller
    ``hot_cache_gb`` or micro-batch helps)."""
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return {}
    gib = float(2**30)
    stats = torch.cuda.memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    return {"gpu/device_used_gib": (total - free) / gib,  # the driver's view, as nvidia-smi shows it
            "gpu/mem_allocated_gib": torch.cuda.memory_allocated(device) / gib,
            "gpu/mem_peak_gib": torch.cuda.max_memory_allocated(device) / gib,
            "gpu/mem_reserved_gib": torch.cuda.memory_reserved(device) / gib,
            "gpu/alloc_retries": float(stats.get("num_alloc_retries", 0))}


def proc_gib(path: str, keys: dict[str, str]) -> dict[str, float]:
    """GiB of the ``key: N kB`` lines of a /proc file (``/proc/meminfo``, ``/proc/PID/status``) named in ``keys``,
    under the names ``keys`` maps them to; empty where the file cannot be read."""
    out: dict[str, float] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in keys:
                    out[keys[key]] = int(rest.split()[0]) / 2**20
    except (OSError, ValueError, IndexError):
        return {}
    return out


def host_memory() -> dict[str, float]:
    """This process's host memory in GiB, from ``/proc/self/status`` (empty where there is none): ``host/rss_anon_gib``
    (its private memory, the expert store's registered pieces included: what grows if something accumulates from
    step to step) and ``host/rss_shared_gib`` (shared pages, e.g. memory pinned by cudaHostAlloc, which the driver
    maps as shared)."""
    return proc_gib("/proc/self/status", {"RssAnon": "host/rss_anon_gib", "RssShmem": "host/rss_shared_gib"})


def load_entropy(load: torch.Tensor) -> torch.Tensor:
    """Normalised entropy of each layer's expert load.

    Args:
        load: (M, E) tokens per expert for M MoE layers.

    Returns:
        (M,) values in [0, 1]; 1 is uniform load.
    """
    load = load.double()
    p = load / load.sum(dim=1, keepdim=True).clamp_min(1)  # (M, E)
    h = -(p * torch.log(p.clamp_min(1e-300))).sum(dim=1)  # (M,), 0 log 0 = 0
    return (h / torch.log(torch.tensor(float(load.shape[1])))).float()


def load_heatmap(load: torch.Tensor, layer_ids: list[int], *, title: str = "", share: bool = True) -> Any:
    """A matplotlib Figure: MoE layers (rows) by experts (columns), coloured by each expert's load.

    At least 8 x 4.5 inches (800 x 450 pixels at :func:`figure_png`'s 100 dpi), larger for many experts or
    layers, so that a 3-layer, 16-expert model's cells are still easy to read.

    Args:
        load: (M, E) tokens routed to each expert (top-k slots, so a row sums to tokens x k).
        layer_ids: the model layer index of each of the M rows.
        title: the figure's title (default: what the colour shows).
        share: colour by the share of the layer's routed tokens (balanced: 1/E everywhere); False: by the
            tokens routed to each expert.
    """
    from matplotlib.figure import Figure  # not pyplot: no backend switch, safe in notebooks and headless runs

    values = load.double()
    if share:
        values = values / values.sum(dim=1, keepdim=True).clamp_min(1)
    grid = values.cpu().numpy()  # (M, E)
    m, e = grid.shape
    fig = Figure(figsize=(min(max(3.0 + 0.16 * e, 8.0), 24.0), min(max(2.0 + 0.3 * m, 4.5), 16.0)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    step = max(1, -(-e // 32))  # at most 32 expert ticks
    ax.set_xticks(range(0, e, step), [str(i) for i in range(0, e, step)])
    row_step = max(1, -(-m // 32))
    ax.set_yticks(range(0, m, row_step), [str(layer_ids[i]) for i in range(0, m, row_step)])
    ax.set_xlabel(f"routed expert (0-{e - 1})")
    ax.set_ylabel("MoE layer (model layer index)")
    what = (f"share of the layer's routed tokens (balanced: 1/{e} = {1 / e:.3g})" if share
            else "tokens routed to the expert")
    ax.set_title(title or f"expert load: {what.split(' (')[0]}")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label(what)
    fig.tight_layout()
    return fig


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """A matplotlib Figure as PNG bytes."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
