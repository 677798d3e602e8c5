"""Seeded random initialisation, one independently seeded chunk at a time: fast on any device, and the same
weights whether they fill a model (:func:`build_random`) or stream to disk (:func:`random_tensors`).

``MoEForCausalLM(config)`` draws every weight from torch's global generator, one tensor after the other on
one CPU core, after ``nn.Linear`` has drawn (and thrown away) its own default init: about 13 ns a parameter,
3.5 minutes and an fp32 copy of the whole model in host memory for a 16 B model. Here the model is built on
the meta device, allocated on its target device, and every tensor is cut into chunks of :data:`CHUNK`
elements, each filled by its own generator seeded from ``(seed, tensor name, chunk index)``::

    seed ──► blake2b(seed, "model.layers.3.mlp.experts.7.up_proj.weight", 0) ──► Generator ──► normal_ ──► chunk 0
         └─► blake2b(seed, "model.layers.3.mlp.experts.7.up_proj.weight", 1) ──► Generator ──► normal_ ──► chunk 1

Chunks depend on nothing else, so CPU threads fill them in any order (``normal_`` releases the GIL, and each
generator has its own lock), a GPU fills them at memory speed, and a tensor's values do not depend on which
other tensors the model has (a 2-layer cut of a preset shares layer 0 with the full depth). Values do depend
on the device type: CUDA's generator (Philox) is not the CPU's (Mersenne Twister).

The distribution is :meth:`~moetrain.models.decoder.MoEForCausalLM.init_kinds`' (the one ``reset_parameters``
follows): N(0, 0.02) matrices, unit norms, zero biases. Normal values are drawn in fp32 and rounded to the
output dtype, so a bf16 stream is the fp32 stream rounded.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

from moetrain.config import ModelConfig
from moetrain.models.decoder import INIT_STD, MoEForCausalLM
from moetrain.models.rope import rotary_for

SEEDED_INIT_MIN_PARAMS = 100_000_000
"""Random initialisation from this many parameters on is seeded per chunk on the compute device (this module:
the GPU, or every CPU thread); smaller models draw from torch's global generator on one core, as they always
have (the same weights for a seed as every earlier run), in under 2 s. The training run's ``random_model``
(:mod:`moetrain.training.model_build`) and the memory planner both follow it."""
CHUNK = 1 << 24
"""Elements per independently seeded chunk: about 0.1 s of one CPU core's ``normal_`` (64 MiB in fp32), so a
16 B model splits into about a thousand pieces for the threads to share, while the seeding stays negligible."""


class _SkipInit(TorchFunctionMode):
    """Turns every ``torch.nn.init`` call into a no-op (on the meta device there is nothing to initialise, and
    torch runs initialisers on meta tensors through its reference ops, about 2 ms a tensor)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return kwargs["tensor"] if "tensor" in kwargs else args[0]
        return func(*args, **kwargs)


def meta_model(config: ModelConfig) -> MoEForCausalLM:
    """``config``'s model on the meta device (names, shapes, dtypes; no memory), without running initialisers:
    about 1 s of module construction for a 16 B model instead of about 4."""
    with torch.device("meta"), _SkipInit():
        return MoEForCausalLM(config)


def chunk_seed(seed: int, name: str, chunk: int) -> int:
    """The generator seed of chunk ``chunk`` of tensor ``name`` (63 bits; a hash, so nearby seeds and names
    give unrelated streams)."""
    digest = hashlib.blake2b(f"{seed}/{name}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def fill_chunk_(flat: torch.Tensor, index: int, kind: str, *, seed: int, name: str, std: float = INIT_STD) -> int:
    """Fill chunk ``index`` of the 1-D view ``flat`` of tensor ``name`` as ``kind`` says; returns its bytes.

    ``normal`` draws N(0, ``std``) in fp32 from the chunk's own generator on ``flat``'s device and rounds it to
    ``flat``'s dtype; ``ones`` and ``zeros`` need no generator.
    """
    piece = flat[index * CHUNK:(index + 1) * CHUNK]
    if kind == "normal":
        generator = torch.Generator(device=piece.device)
        generator.manual_seed(chunk_seed(seed, name, index))
        if piece.dtype == torch.float32:
            piece.normal_(0.0, std, generator=generator)
        else:  # drawn in fp32 so that every dtype's values are the fp32 stream rounded
            piece.copy_(torch.empty(piece.shape, dtype=torch.float32, device=piece.device).normal_(
                0.0, std, generator=generator))
    elif kind in ("ones", "zeros"):
        piece.fill_(1.0 if kind == "ones" else 0.0)
    else:
        raise ValueError(f"{name}: unknown initialisation kind {kind!r}")
    return piece.numel() * piece.element_size()


def _chunks(tensor: torch.Tensor) -> int:
    return max(1, -(-tensor.numel() // CHUNK))


def _threads(threads: Optional[int]) -> int:
    return max(1, threads if threads is not None else torch.get_num_threads())


def _pool(device: torch.device, threads: Optional[int]) -> Optional[ThreadPoolExecutor]:
    """CPU threads for the chunks of host tensors; None on a GPU, whose launches are asynchronous anyway."""
    if device.type != "cpu" or _threads(threads) == 1:
        return None
    return ThreadPoolExecutor(_threads(threads), thread_name_prefix="moetrain-init")


def _submit(pool: Optional[ThreadPoolExecutor], tensor: torch.Tensor, kind: str, seed: int,
            name: str) -> list[Future]:
    flat = tensor.detach().view(-1)
    jobs = []
    for index in range(_chunks(tensor)):
        if pool is None:  # inline: a finished future keeps one code path for both
            done: Future = Future()
            done.set_result(fill_chunk_(flat, index, kind, seed=seed, name=name))
            jobs.append(done)
        else:
            jobs.append(pool.submit(fill_chunk_, flat, index, kind, seed=seed, name=name))
    return jobs


@torch.no_grad()
def init_random_(model: MoEForCausalLM, seed: int, *, threads: Optional[int] = None,
                 on_bytes: Optional[Callable[[int], None]] = None,
                 expert_sink: Optional[Callable[[str, torch.Tensor], None]] = None) -> None:
    """Give every state-dict tensor of the materialised ``model`` its seeded initial value, in place.

    A tied ``lm_head.weight`` is the embedding's tensor and is filled once, as the embedding. ``threads``:
    CPU threads for host tensors (default: torch's intra-op thread count). ``on_bytes(n)`` is called as chunks
    finish (a progress bar); on a GPU the fills are only queued, and this returns once they ran.

    ``expert_sink(name, value)``: every routed expert parameter is drawn in fp32 on the device of the model's
    first tensor (the values an fp32 model built there has), one tensor at a time, copied (rounded) into the
    parameter, whatever its dtype and device, and handed to the sink: an offload store takes its master there
    (:func:`moetrain.offload.staged_init.random_into_tiers`), so the fp32 experts never exist all at once.
    """
    kinds = model.init_kinds()
    tensors = model.state_dict(keep_vars=True)
    device = next(iter(tensors.values())).device
    experts = model.expert_parameter_names() if expert_sink is not None else set()
    pool = _pool(device, threads)
    seen: set[int] = set()
    try:
        jobs: list[Future] = []
        for name, kind in kinds.items():
            tensor = tensors[name]
            if id(tensor) in seen:  # tied weights: one tensor under two names
                continue
            seen.add(id(tensor))
            if name in experts:
                value = torch.empty(tensor.shape, dtype=torch.float32, device=device)
                for job in _submit(pool, value, kind, seed, name):
                    job.result()
                tensor.copy_(value)
                expert_sink(name, value)
                if on_bytes is not None:
                    on_bytes(tensor.numel() * tensor.element_size())
                continue
            jobs += _submit(pool, tensor, kind, seed, name)
        for job in jobs:
            nbytes = job.result()
            if on_bytes is not None:
                on_bytes(nbytes)
    finally:
        if pool is not None:
            pool.shutdown()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_tensors(config: ModelConfig, seed: int, *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", threads: Optional[int] = None,
                   ahead_bytes: int = 2**30) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(internal name, CPU tensor)`` for every state-dict tensor of ``config``'s model, in state-dict order,
    with the values :func:`build_random` gives on ``device`` (a tied ``lm_head.weight`` left out, as exports do).

    Streaming: tensors are generated while earlier ones are consumed, at most about ``ahead_bytes`` plus one
    tensor ahead, so host memory never holds the model. ``dtype``: the output dtype of every tensor that the
    model keeps in its parameter dtype (DeepSeek-V3's routing bias stays fp32, as a cast model keeps it).
    """
    device = torch.device(device)
    model = meta_model(config).to(dtype)  # the cast keeps the routing bias fp32 (TopKRouter._apply)
    kinds = model.init_kinds()
    shapes = model.state_dict(keep_vars=True)
    if config.tie_word_embeddings:
        kinds.pop("lm_head.weight", None)
    pool = _pool(device, threads)
    pending: deque[tuple[str, torch.Tensor, list[Future]]] = deque()
    queued = 0
    try:
        for name, kind in kinds.items():
            meta = shapes[name]
            tensor = torch.empty(meta.shape, dtype=meta.dtype, device=device)
            pending.append((name, tensor, _submit(pool, tensor, kind, seed, name)))
            queued += tensor.numel() * tensor.element_size()
            while pending and (queued > ahead_bytes or pool is None):
                done_name, done, jobs = pending.popleft()
                for job in jobs:
                    job.result()
                queued -= done.numel() * done.element_size()
                yield done_name, done.cpu()
        while pending:
            done_name, done, jobs = pending.popleft()
            for job in jobs:
                job.result()
            yield done_name, done.cpu()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def build_random(config: ModelConfig, seed: int, *, device: str | torch.device = "cpu",
                 threads: Optional[int] = None, announce: bool = False) -> MoEForCausalLM:
    """``config``'s model in fp32 on ``device`` (in train mode), every tensor seeded per chunk from ``seed``.

    Built on the meta device and allocated on ``device`` directly: no host copy when ``device`` is a GPU.
    ``announce``: print what is built and how long it took to stderr (with a bar in bytes on a terminal).
    """
    device = torch.device(device)
    model = meta_model(config).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gives each module its own tensor; tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary.register_buffer("inv_freq", rotary_for(config).inv_freq.to(device), persistent=False)
    fill_random_(model, seed, threads=threads, announce=announce)
    return model.train()


def fill_random_(model: MoEForCausalLM, seed: int, *, threads: Optional[int] = None, announce: bool = False,
                 expert_sink: Optional[Callable[[str, torch.Tensor], None]] = None) -> None:
    """:func:`init_random_` on a materialised ``model`` (``expert_sink`` as there), announced as :func:`build_random`
    announces it when ``announce``: what is built, a bar in bytes on a terminal, how long it took."""
    from moetrain.progress import shown

    config = model.config
    device = next(iter(model.state_dict().values())).device
    start = time.perf_counter()
    where = f"{device.type}" if device.type == "cpu" else str(device)
    if announce:
        print(f"building {config.name}: {config.num_hidden_layers} layers, "
              f"{config.param_counts()['total'] / 1e9:.1f} B parameters, random init on {where}"
              + (f" ({_threads(threads)} threads)" if device.type == "cpu" else ""), file=sys.stderr, flush=True)
    bar = None
    if announce and shown():
        from tqdm.auto import tqdm

        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        bar = tqdm(total=total, desc=f"init {config.name}", unit="B", unit_scale=True, unit_divisor=1024,
                   file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        init_random_(model, seed, threads=threads, on_bytes=None if bar is None else bar.update,
                     expert_sink=expert_sink)
    finally:
        if bar is not None:
            bar.close()
    if announce:
        print(f"built {config.name} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
