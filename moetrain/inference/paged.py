"""Inference with only the routed experts on the device: each MoE block's ``experts`` is replaced by
:class:`PagedExperts`, which has the same forward signature and pages the routed experts through an
:class:`~moetrain.inference.cache.ExpertCache`.

One MoE layer ``l`` of a forward on CUDA (decode: a few tokens; prefill: many)::

    compute stream   router(l)  lookahead: router(l+1) on x_l   | host reads counts(l) and the predicted
                                                                 | set of l+1 together (the layer's one sync)
                     wait ready[slots of l's misses] -> experts of l (per-expert SwiGLU) -> combine -> ...
    copy stream      (prefetched rows of l, queued during l-1) | H2D misses of l, then the top-k predicted experts
                                                                  of l+1 (after misses: the likeliest only)
                     the copy into a slot first waits on freed[slot]: the last kernel that read it

The lookahead is the idea of :mod:`moetrain.offload.lookahead`: the next layer's router applied to this
layer's normalized input predicts the next layer's experts well, because the residual stream changes little
from one layer to the next. The last MoE layer prefetches the first layer's experts of the previous call (the
next decode step). A prefetch is a guess, and a wrong one costs link time that no demand needed: only the
model's top-k experts (k = experts per token) of the prediction are offered, most voted first (a batch's tokens
vote; equal votes, as one decode token's k choices, in the order of the router's weights: :func:`likely_experts`),
and the cache copies only the likeliest while the link still carries the current layer's misses (the default of
``prefetch_when_busy``) and only into slots whose experts are worth less than a guess
(:meth:`~moetrain.inference.cache.ExpertCache.prefetch`).
Experts already on the device never wait; a layer that needs more experts than there are slots (a long prefill
with a small cache) runs in groups: its cached experts stay in their slots for the next call, and the rest pass
through the staging slots, each group's reused by the next (:meth:`ExpertCache.acquire`).

Two compute paths per group of slots, chosen per call (``impl``, set by ``model.set_expert_impl``):

* loop: ``F.linear`` per expert, concatenated in expert order, weighted and summed by ``combine``: the
  ops of :class:`~moetrain.models.experts.RoutedExperts`' loop path, so outputs equal the resident model's
  exactly. Decode (fewer than :data:`GROUPED_MIN_TOKENS` tokens), the CPU, and dtypes or shapes the grouped
  kernel rejects.
* grouped (``auto`` on CUDA sm90+ in bf16 from :data:`GROUPED_MIN_TOKENS` tokens, i.e. prefill and
  validation; ``grouped`` forces it): three ``torch._grouped_mm`` over the slot buffer itself, viewed as
  (S, I, H), (S, I, H), (S, H, I) (no copy of the weights; int8 slots are gathered and dequantized first).
  The rows are permuted into slot order and each slot is one group (slots of other experts get none).

On the CPU the copy stream and the events collapse into plain copies, so the same bookkeeping (what is
cached, prefetched, hit) runs in CI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moetrain.inference.cache import ExpertCache, slots_for_budget
from moetrain.inference.config import InferenceConfig
from moetrain.inference.store import HostExpertStore, ShardExpertStore
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.experts import choose_grouped, combine, dispatch, grouped_swiglu_forward, sort_rows
from moetrain.models.router import Routing, TopKRouter

_EXPERT_PARAM = ".mlp.experts."
GPU_RESERVE_BYTES = 2 * 2**30
"""Device memory left free for activations, the KV cache and the allocator when the cache is sized from free
memory (plus 10% of the device)."""
GROUPED_MIN_TOKENS = 32
"""Tokens of a call from which ``impl=auto`` runs a layer's experts as grouped GEMMs (on CUDA sm90+, bf16): a
prefill or a validation batch. Decode steps (a token per sequence) keep the per-expert loop."""


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
        self.impl = "auto"  # auto, grouped or loop (MoEForCausalLM.set_expert_impl)
        self.last_routed: list[int] = []
        self.last_counts: list[int] = []  # tokens per expert of the last call (E,)
        self.last_mass: list[float] = []  # the routing weights per expert of the last call (E,), if feeds_wrap
        self.feeds_wrap = False  # the first MoE layer: the last one's guess for the next call is its routing
        self.top_k = 1  # experts per token, as the last call routed

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, experts={self.num_experts}, paged"

    def _predict(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """(2, E) fp32: how many tokens of ``x`` (T, H) the next layer's router sends to each expert (votes), and
        the router's scores of those choices summed per expert (mass, which orders experts of equal votes)."""
        router = self._next_router
        if router is None or not self.prefetch:
            return None
        logits = F.linear(x.float(), router.weight.float())  # (T, E)
        scores = logits.softmax(dim=-1) if router.scoring_func == "softmax" else logits.sigmoid()
        weight, idx = router.select(scores)  # (T, k)
        return _per_expert(idx, weight, router.num_experts)

    def use_grouped(self, x_sorted: torch.Tensor, tokens: int) -> bool:
        """Whether this call runs grouped GEMMs (see the module docstring): ``x_sorted`` (N, H), ``tokens`` T."""
        if self.impl == "auto" and tokens < GROUPED_MIN_TOKENS:
            return False  # decode: the per-expert loop over the few routed experts
        return choose_grouped(self.impl, x_sorted, hidden=self.hidden_size, width=self.intermediate_size)

    def forward(self, x: torch.Tensor, routing: Routing, *, recomputing: bool = False) -> torch.Tensor:
        """x: (T, H); returns (T, H) = sum over chosen experts of weight * expert(x). ``recomputing`` (a training
        re-run of a checkpointed layer) does not arise in inference; it is accepted for the block's call."""
        d = dispatch(routing)
        x_sorted = sort_rows(x, d)  # (N, H)
        if torch.is_autocast_enabled(x.device.type):
            x_sorted = x_sorted.to(torch.get_autocast_dtype(x.device.type))
        grouped = self.use_grouped(x_sorted, x.shape[0])
        predicted = self._predict(x)
        # the host must know which experts to page: the layer's one read, the lookahead riding along (and for the
        # first layer its own routing weights per expert, which order the last layer's guess for the next call)
        num = self.num_experts
        rows = []
        if self.feeds_wrap:
            rows.append(_per_expert(routing.topk_idx, routing.topk_weight, num)[1])
        if predicted is not None:
            rows.append(predicted.flatten())
        # fp64 holds every count exactly
        host = torch.cat([d.counts.double(), *(r.double() for r in rows)]).tolist() if rows else d.counts.tolist()
        sizes = [int(n) for n in host[:num]]
        mass = host[num:2 * num] if self.feeds_wrap else []
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        active = [i for i, n in enumerate(sizes) if n]
        self.last_routed, self.last_counts, self.last_mass = active, sizes, mass
        self.top_k = routing.topk_idx.shape[-1]
        guess = self._guess(None if predicted is None else host[(2 if self.feeds_wrap else 1) * num:])
        pieces: dict[int, torch.Tensor] = {}
        todo = list(active)
        first_group = True
        while todo:
            got = self.cache.acquire(self.layer_idx, todo, done=pieces.keys())
            if first_group and len(got.experts) == len(todo) and guess:
                self.cache.prefetch(self.next_layer, guess)
            first_group = False
            if grouped:
                pieces.update(self._grouped(x_sorted, starts, got.experts, got.slots))
            else:
                for e, slot in zip(got.experts, got.slots, strict=True):
                    wg, wu, wd = self.cache.weights(slot, x_sorted.dtype)
                    xe = x_sorted[starts[e]:starts[e + 1]]
                    pieces[e] = F.linear(F.silu(F.linear(xe, wg)) * F.linear(xe, wu), wd)
            self.cache.release(got)
            placed = set(got.experts)
            todo = [e for e in todo if e not in placed]
        y = torch.cat([pieces[e] for e in active], 0) if active else x_sorted.new_zeros(x_sorted.shape)
        return combine(y, d, x.dtype)

    def _grouped(self, x_sorted: torch.Tensor, starts: list[int], experts: list[int],
                 slots: list[int]) -> dict[int, torch.Tensor]:
        """{expert: (n_e, H) output} of ``experts`` (held in ``slots``) by three grouped GEMMs.

        ``x_sorted`` (N, H) holds expert e's rows at ``starts[e]:starts[e + 1]``. The rows are gathered in the
        order of the experts' positions in the stacked weights (G groups, one per position; positions without
        one of ``experts`` get no rows), so group g's rows meet weight g.
        """
        wg, wu, wd, position = self.cache.grouped_weights(slots, x_sorted.dtype)
        counts = [0] * wg.shape[0]
        for e, pos in zip(experts, position, strict=True):
            counts[pos] = starts[e + 1] - starts[e]
        ordered = [e for _, e in sorted(zip(position, experts, strict=True))]
        rows = torch.cat([torch.arange(starts[e], starts[e + 1]) for e in ordered])  # (n,) host
        xs = x_sorted.index_select(0, rows.to(x_sorted.device, non_blocking=True))  # (n, H) in position order
        ends = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)  # (G,)
        y, _, _ = grouped_swiglu_forward(xs.contiguous(), ends.to(x_sorted.device, non_blocking=True), wg=wg, wu=wu,
                                         wd=wd)
        out: dict[int, torch.Tensor] = {}
        start = 0
        for e in ordered:
            n = starts[e + 1] - starts[e]
            out[e] = y[start:start + n]
            start += n
        return out

    def _guess(self, predicted: Optional[list[float]]) -> list[int]:
        """The next layer's ``top_k`` likeliest experts (:func:`likely_experts` of ``predicted``: (E,) votes then
        (E,) mass), which the cache is offered to prefetch once this layer's experts are placed; none without
        prefetch. The last layer offers the first layer's experts of this call, for the next call."""
        if not self.prefetch or self.next_layer is None:
            return []
        if predicted is None:  # the last layer: the first layer's experts of this call, for the next call
            first = self._first_block_experts
            if first is None:
                return []
            votes, mass = first.last_counts, first.last_mass
        else:
            votes, mass = predicted[:self.num_experts], predicted[self.num_experts:]
        return likely_experts(votes, mass, self.top_k)

    _first_block_experts: Optional[PagedExperts] = None


def _per_expert(idx: torch.Tensor, weight: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(2, E) fp32: the tokens choosing each expert in ``idx`` (T, k) and the sum of their ``weight`` (T, k)
    (scatter_add_, not bincount: bincount on CUDA syncs the host to size its output)."""
    flat = idx.reshape(-1)
    out = torch.zeros(2, num_experts, dtype=torch.float32, device=idx.device)
    out[0].scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    out[1].scatter_add_(0, flat, weight.reshape(-1).float())
    return out


def likely_experts(votes: list[float], mass: list[float], k: int) -> list[int]:
    """The ``k`` experts the most tokens chose (``votes`` (E,)), those of equal votes ordered by the router's
    summed weight for them (``mass`` (E,); one decode token's two choices are ordered by its router), then by id.
    The first is the likeliest: what the cache copies first, and alone while its link is busy
    (``prefetch_when_busy``)."""
    chosen = [e for e, n in enumerate(votes) if n]
    return sorted(chosen, key=lambda e: (-votes[e], -(mass[e] if mass else 0.0), e))[:k]


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
    cache = ExpertCache(store, cache_slots(config, store, device), device, policy=config.cache_policy,
                        prefetch_when_busy=config.prefetch_when_busy)
    paged: list[PagedExperts] = []
    for i, block in enumerate(blocks):
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        module = PagedExperts(cache, block.layer_idx, next_router=None if nxt is None else nxt.gate,
                              next_layer=blocks[0].layer_idx if nxt is None else nxt.layer_idx,
                              prefetch=config.prefetch)
        block.experts = module
        paged.append(module)
    object.__setattr__(paged[-1], "_first_block_experts", paged[0])  # not a submodule
    paged[0].feeds_wrap = config.prefetch
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
    if config.expert_source != "host":
        raise ValueError("a model already loaded pages its experts from host memory: expert_source=shards needs "
                         "the model directory (load_paged)")
    device = torch.device(device) if device is not None else model.model.embed_tokens.weight.device
    store = HostExpertStore.from_blocks(blocks, dtype=torch.bfloat16 if config.expert_dtype == "bf16" else None,
                                        quantize=config.expert_dtype == "int8", pin=device.type == "cuda")
    store.fill_from(blocks)
    return _install(model, store, config, device)


def _store_dtype(config: InferenceConfig, dtype: torch.dtype) -> torch.dtype:
    """The compute dtype the experts' rows are served in: bf16 for ``expert_dtype=bf16``, else ``dtype``."""
    return torch.bfloat16 if config.expert_dtype == "bf16" else dtype


def _read_dense(model: MoEForCausalLM, path: Path, store: HostExpertStore) -> None:
    """Copy the checkpoint at ``path`` into ``model`` (routed experts paged): the dense tensors into the model's
    parameters, the routed experts' into ``store`` (a :class:`ShardExpertStore` reads only the dense ones).

    Raises:
        ShardError: as :func:`moetrain.models.hf.checked_tensors` (unexpected, mis-shaped or missing tensors).
    """
    from moetrain.models.hf import checked_tensors
    from moetrain.models.hf_load import _internal_tensors, _is_mtp_tensor, iter_shard_tensors, state_shapes
    from moetrain.shards import ShardError

    config = model.config
    targets = model.state_dict(keep_vars=True)  # no routed expert in it: they are paged
    if not isinstance(store, ShardExpertStore):
        shapes = state_shapes(config)
        for name, value in checked_tensors(path, config, shapes):
            if _EXPERT_PARAM in name:
                store.put_named(name, value)
            else:
                targets[name].copy_(value)
        return
    on_disk = {name for _, name, _ in store.location.values()}
    shapes = {n: tuple(t.shape) for n, t in targets.items()}
    seen: set[str] = set()
    for shard, disk_name, tensor in iter_shard_tensors(path, names=None):
        if disk_name in on_disk or _is_mtp_tensor(config, disk_name) or disk_name.endswith(".rotary_emb.inv_freq"):
            continue
        for name, value in _internal_tensors(config.family, disk_name, tensor, shard):
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue
            if shapes.get(name) != tuple(value.shape):
                raise ShardError(f"{shard}: tensor {disk_name!r} (maps to {name!r}) has shape {tuple(value.shape)}; "
                                 f"the model expects {shapes.get(name)}")
            targets[name].copy_(value)
            seen.add(name)
    missing = sorted(n for n in shapes if n not in seen and not (config.tie_word_embeddings and n == "lm_head.weight"))
    if missing:
        raise ShardError(f"{path}: no shard holds {missing[0]!r} ({len(missing)} tensors missing)")


def _new_store(model: MoEForCausalLM, path: Optional[Path], config: InferenceConfig, dtype: torch.dtype,
               device: torch.device) -> HostExpertStore:
    """A store for ``model``'s MoE blocks (meta or paged experts) of ``config``'s source over the directory
    ``path``, to be filled by :func:`_read_dense`; without ``path`` a placeholder holding no row."""
    blocks = _moe_blocks(model)
    quantize = config.expert_dtype == "int8"
    if config.expert_source == "shards" and path is not None:
        from moetrain.models.hf_load import _is_mtp_tensor
        from moetrain.shards import read_weight_map

        first = blocks[0].experts
        skip = {n for n in read_weight_map(path) if _is_mtp_tensor(model.config, n)}
        return ShardExpertStore(path, model.config.family, [b.layer_idx for b in blocks], first.num_experts,
                                first.hidden_size, first.intermediate_size, dtype=_store_dtype(config, dtype),
                                quantize=quantize, skip=skip)
    return HostExpertStore.from_blocks(blocks, dtype=_store_dtype(config, dtype), quantize=quantize,
                                       pin=device.type == "cuda", allocate=path is not None)


def load_paged(path: str | Path, config: Optional[InferenceConfig] = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", **settings) -> MoEForCausalLM:
    """:func:`moetrain.from_pretrained` with paged experts: the dense part is loaded onto ``device``, the routed
    experts' weights stream from the shards straight into host memory (never onto the device), or, with
    ``expert_source="shards"``, stay in the shards (memory-mapped) until the cache misses them.

    Args:
        path: a Hugging Face model directory, a moetrain checkpoint or a run directory.
        config: the paging settings, or their fields as keywords (``cache_policy="lfu"``, ``cache_slots=8``, ...).
        dtype: the weights' dtype (experts: their compute dtype, unless ``expert_dtype`` is bf16 or int8).
        device: the compute device.

    Raises:
        ConfigError, ShardError: as :func:`moetrain.models.hf.from_pretrained`.
    """
    from moetrain.models.hf import load_config, resolve_model_path

    config = config or InferenceConfig(**{"expert_weights": "paged", **settings})
    device = torch.device(device)
    path = resolve_model_path(path)
    model = empty_paged(load_config(path), config, dtype=dtype, device=device, path=path)
    with torch.no_grad():
        _read_dense(model, path, paged_cache(model).store)
    return model.eval()


def empty_paged(model_config, config: InferenceConfig, *, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", path: Optional[Path] = None) -> MoEForCausalLM:
    """A model of ``model_config`` (a :class:`~moetrain.config.ModelConfig`) with paged experts and uninitialised
    weights: the dense part on ``device``, no routed expert weight allocated on it. With ``path`` (the directory
    :func:`_read_dense` will fill it from) the store is ready for it; without, it holds no row until
    :func:`load_paged_weights`.
    """
    from moetrain.models.hf import empty_model

    device = torch.device(device)
    model = empty_model(model_config, dtype=dtype, device=device, expert_device="meta")
    store = _new_store(model, path, config, dtype, device)
    _install(model, store, config, device)
    return model


@torch.no_grad()
def load_paged_weights(model: MoEForCausalLM, path: str | Path, config: InferenceConfig) -> None:
    """Load the checkpoint or model directory at ``path`` into a model whose experts are paged (its config must
    match): the dense weights into the model, the experts into a new store of ``config``'s source and dtype
    (the old store is dropped; the cache keeps its size and policy and starts empty).

    Raises:
        ValueError: the model's experts are not paged. ShardError: as :func:`load_paged`.
    """
    from moetrain.models.hf import resolve_model_path

    cache = paged_cache(model)
    if cache is None:
        raise ValueError("the model's experts are not paged")
    path = resolve_model_path(path)
    old = cache.store
    cache.store = HostExpertStore(old.layers, old.num_experts, old.hidden, old.width, dtype=old.dtype,
                                  allocate=False)  # the old rows go before the new ones are allocated
    del old
    store = _new_store(model, path, config, cache.store.dtype, cache.device)
    _read_dense(model, path, store)
    replace_cache(model, num_slots=cache.num_slots, policy=cache.policy_name, store=store)


def replace_cache(model: MoEForCausalLM, *, num_slots: int, policy: str,
                  store: Optional[HostExpertStore] = None, prefetch_when_busy: Optional[str] = None) -> ExpertCache:
    """Give a paged model a new, empty expert cache over the same host store (another policy or size, without
    reading the weights again) or over ``store``; the old cache's device memory is freed. ``prefetch_when_busy``:
    as :class:`InferenceConfig`'s (default: the old cache's)."""
    old = paged_cache(model)
    if old is None:
        raise ValueError("the model's experts are not paged")
    store, device = store or old.store, old.device
    busy = old.prefetch_when_busy if prefetch_when_busy is None else prefetch_when_busy
    old.data = old.scales = None  # type: ignore[assignment]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    cache = ExpertCache(store, num_slots, device, policy=policy, prefetch_when_busy=busy)
    for block in _moe_blocks(model):
        block.experts.cache = cache
    return cache
