"""Inference with only the routed experts on the device: each MoE block's ``experts`` is replaced by
:class:`PagedExperts`, which has the same forward signature and pages the routed experts through an
:class:`~moetrain.inference.cache.ExpertCache`.

One MoE layer ``l`` of a forward on CUDA (decode: a few tokens; prefill: many)::

    compute stream   router(l)  lookahead: router(l+1) on x_l   | host reads counts(l) and the predicted
                                                                 | set of l+1 together (the layer's one sync)
                     wait ready[slots of l's misses] -> experts of l (per-expert SwiGLU) -> combine -> ...
    copy stream      (prefetched rows of l, queued during l-1) | H2D misses of l | H2D predicted experts of l+1
                                                                                  '-- runs under l's GEMMs
                     the copy into a slot first waits on freed[slot]: the last kernel that read it

The lookahead is the idea of :mod:`moetrain.offload.lookahead`: the next layer's router applied to this
layer's normalized input predicts the next layer's experts well, because the residual stream changes little
from one layer to the next. The last MoE layer prefetches the first layer's experts of the previous call (the
next decode step). Experts already on the device never wait; a layer that needs more experts than there are
slots (a long prefill with a small cache) runs in groups, each group's slots reused by the next.

On the CPU the copy stream and the events collapse into plain copies, so the same bookkeeping (what is
cached, prefetched, hit) runs in CI. Outputs equal the resident model's: the experts run the ops of
:class:`~moetrain.models.experts.RoutedExperts`' loop path (``F.linear`` per expert, concatenated in expert
order, weighted and summed with ``index_add_``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moetrain.inference.cache import ExpertCache, slots_for_budget
from moetrain.inference.config import InferenceConfig
from moetrain.inference.store import HostExpertStore
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.experts import dispatch
from moetrain.models.router import Routing, TopKRouter

_EXPERT_PARAM = ".mlp.experts."
GPU_RESERVE_BYTES = 2 * 2**30
"""Device memory left free for activations, the KV cache and the allocator when the cache is sized from free
memory (plus 10% of the device)."""


class PagedExperts(nn.Module):
    """The routed experts of one MoE layer, served from an :class:`ExpertCache` (no parameters of its own).

    Args:
        cache: the model-wide expert cache.
        layer_idx: this MoE layer.
        next_router: the next MoE layer's router (its lookahead) or None for the last MoE layer.
        next_layer: that layer's index; for the last layer the first MoE layer (prefetched from its last routing).
        prefetch: whether to prefetch at all.
    """

    def __init__(self, cache: ExpertCache, layer_idx: int, *, next_router: Optional[TopKRouter],
                 next_layer: Optional[int], prefetch: bool = True) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.num_experts = cache.store.num_experts
        self.hidden_size, self.intermediate_size = cache.store.hidden, cache.store.width
        # a plain attribute, not a submodule: the router belongs to its own block (state dict, devices)
        object.__setattr__(self, "_next_router", next_router)
        self.next_layer = next_layer
        self.prefetch = prefetch
        self.last_routed: list[int] = []

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, experts={self.num_experts}, paged"

    def _predict(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """(E,) int64 mask of the experts the next layer's router picks for ``x`` (T, H), on the device."""
        router = self._next_router
        if router is None or not self.prefetch:
            return None
        logits = F.linear(x.float(), router.weight.float())  # (T, E)
        scores = logits.softmax(dim=-1) if router.scoring_func == "softmax" else logits.sigmoid()
        idx = router.select(scores)[1].reshape(-1)  # (T * k,)
        return torch.zeros(router.num_experts, dtype=torch.int64, device=x.device).index_fill_(0, idx, 1)

    def forward(self, x: torch.Tensor, routing: Routing, *, recomputing: bool = False) -> torch.Tensor:
        """x: (T, H); returns (T, H) = sum over chosen experts of weight * expert(x). ``recomputing`` (a training
        re-run of a checkpointed layer) does not arise in inference; it is accepted for the block's call."""
        d = dispatch(routing)
        x_sorted = x[d.token_of]  # (N, H)
        if torch.is_autocast_enabled(x.device.type):
            x_sorted = x_sorted.to(torch.get_autocast_dtype(x.device.type))
        predicted = self._predict(x)
        # the host must know which experts to page: the layer's one read, the lookahead riding along
        both = d.counts if predicted is None else torch.cat([d.counts, predicted])
        host = both.tolist()
        sizes = host[:self.num_experts]
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        active = [e for e, n in enumerate(sizes) if n]
        self.last_routed = active
        pieces: dict[int, torch.Tensor] = {}
        todo = list(active)
        first_group = True
        while todo:
            got = self.cache.acquire(self.layer_idx, todo)
            if first_group and len(got.experts) == len(todo):
                self._start_prefetch(host[self.num_experts:] if predicted is not None else None)
            first_group = False
            for e, slot in zip(got.experts, got.slots, strict=True):
                wg, wu, wd = self.cache.weights(slot, x_sorted.dtype)
                xe = x_sorted[starts[e]:starts[e + 1]]
                pieces[e] = F.linear(F.silu(F.linear(xe, wg)) * F.linear(xe, wu), wd)
            self.cache.release(got)
            placed = set(got.experts)
            todo = [e for e in todo if e not in placed]
        y = torch.cat([pieces[e] for e in active], 0) if active else x_sorted.new_zeros(x_sorted.shape)
        y = y * d.weight[:, None].to(y.dtype)  # (N, H)
        out = torch.zeros_like(x)
        out.index_add_(0, d.token_of, y.to(x.dtype))
        return out

    def _start_prefetch(self, predicted: Optional[list[int]]) -> None:
        """Queue the next layer's likely experts behind this layer's misses on the copy stream."""
        if not self.prefetch or self.next_layer is None:
            return
        if predicted is not None:
            experts = [e for e, hit in enumerate(predicted) if hit]
        else:  # the last layer: the first layer's experts of this call, for the next call
            first = self._first_block_experts
            experts = first.last_routed if first is not None else []
        self.cache.prefetch(self.next_layer, experts)

    _first_block_experts: Optional[PagedExperts] = None


# ---------------------------------------------------------------------------------------------- installing
def _moe_blocks(model: MoEForCausalLM) -> list[nn.Module]:
    return model.moe_blocks()


def cache_slots(config: InferenceConfig, store: HostExpertStore, device: torch.device) -> int:
    """The number of expert slots ``config`` asks for on ``device`` (see :class:`InferenceConfig`)."""
    if config.cache_slots is not None:
        return min(config.cache_slots, store.total_experts)
    if config.gpu_memory_gb is not None:
        return slots_for_budget(config.gpu_memory_gb * 1e9, store.row_bytes, store.total_experts)
    if device.type != "cuda":
        return store.total_experts
    free, total = torch.cuda.mem_get_info(device)
    return slots_for_budget(free - GPU_RESERVE_BYTES - 0.1 * total, store.row_bytes, store.total_experts)


def _install(model: MoEForCausalLM, store: HostExpertStore, config: InferenceConfig,
             device: torch.device) -> ExpertCache:
    blocks = _moe_blocks(model)
    cache = ExpertCache(store, cache_slots(config, store, device), device, policy=config.cache_policy)
    paged: list[PagedExperts] = []
    for i, block in enumerate(blocks):
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        module = PagedExperts(cache, block.layer_idx, next_router=None if nxt is None else nxt.gate,
                              next_layer=blocks[0].layer_idx if nxt is None else nxt.layer_idx,
                              prefetch=config.prefetch)
        block.experts = module
        paged.append(module)
    object.__setattr__(paged[-1], "_first_block_experts", paged[0])  # not a submodule
    return cache


def paged_cache(model: MoEForCausalLM) -> Optional[ExpertCache]:
    """The expert cache of a model whose experts are paged (None for resident experts)."""
    blocks = _moe_blocks(model)
    experts = blocks[0].experts if blocks else None
    return experts.cache if isinstance(experts, PagedExperts) else None


@torch.no_grad()
def install_paged_experts(model: MoEForCausalLM, config: Optional[InferenceConfig] = None,
                          device: Optional[torch.device | str] = None, **settings) -> ExpertCache:
    """Move a resident model's routed experts into host memory and page them from there from now on.

    Args:
        model: a model with resident experts (on the CPU or the device); its expert weights are copied into a
            :class:`HostExpertStore` and dropped, its other weights stay where they are.
        config: the settings (``expert_weights`` is taken as ``paged``); or pass its fields as keywords.
        device: the compute device (default: where the model's embeddings are).

    Returns:
        The model's :class:`ExpertCache` (its ``stats`` and ``trace`` are the telemetry).

    Raises:
        ValueError: the experts are already paged, or MoE layers differ in expert shape.
    """
    config = config or InferenceConfig(**{"expert_weights": "paged", **settings})
    if paged_cache(model) is not None:
        raise ValueError("the model's experts are already paged")
    blocks = _moe_blocks(model)
    if not blocks:
        raise ValueError("the model has no MoE layer to page")
    device = torch.device(device) if device is not None else model.model.embed_tokens.weight.device
    store = HostExpertStore.from_blocks(blocks, quantize=config.expert_dtype == "int8", pin=device.type == "cuda")
    store.fill_from(blocks)
    return _install(model, store, config, device)


def load_paged(path: str | Path, config: Optional[InferenceConfig] = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", **settings) -> MoEForCausalLM:
    """:func:`moetrain.from_pretrained` with paged experts: the dense part is loaded onto ``device``, the routed
    experts' weights stream from the shards straight into host memory (never onto the device).

    Args:
        path: a Hugging Face model directory, a moetrain checkpoint or a run directory.
        config: the paging settings, or their fields as keywords (``cache_policy="lfu"``, ``cache_slots=8``, ...).
        dtype: the weights' dtype (experts: their compute dtype, unless ``expert_dtype="int8"``).
        device: the compute device.

    Raises:
        ConfigError, ShardError: as :func:`moetrain.models.hf.from_pretrained`.
    """
    from moetrain.models.hf import checked_tensors, empty_model, load_config, resolve_model_path

    config = config or InferenceConfig(**{"expert_weights": "paged", **settings})
    device = torch.device(device)
    path = resolve_model_path(path)
    model_config = load_config(path)
    model = empty_model(model_config, dtype=dtype, device=device, expert_device="meta")
    blocks = _moe_blocks(model)
    store = HostExpertStore.from_blocks(blocks, dtype=dtype, quantize=config.expert_dtype == "int8",
                                        pin=device.type == "cuda")
    targets = model.state_dict(keep_vars=True)  # the experts' entries are meta tensors: shapes, no memory
    with torch.no_grad():
        for name, value in checked_tensors(path, model_config, {n: tuple(t.shape) for n, t in targets.items()}):
            if _EXPERT_PARAM in name:
                store.put_named(name, value)
            else:
                targets[name].copy_(value)
    _install(model, store, config, device)
    return model.eval()


def replace_cache(model: MoEForCausalLM, *, num_slots: int, policy: str) -> ExpertCache:
    """Give a paged model a new, empty expert cache over the same host store (another policy or size, without
    reading the weights again); the old cache's device memory is freed."""
    old = paged_cache(model)
    if old is None:
        raise ValueError("the model's experts are not paged")
    store, device = old.store, old.device
    old.data = old.scales = None  # type: ignore[assignment]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    cache = ExpertCache(store, num_slots, device, policy=policy)
    for block in _moe_blocks(model):
        block.experts.cache = cache
    return cache
