"""Start from a Hugging Face model (or a moetrain checkpoint) with the routed experts' master weights
streamed straight into their tier.

The model is built empty on the compute device with the dense part in fp32 and the routed experts in
their compute dtype (bf16 on a GPU); the expert store is created before any weight is read; then the
checkpoint streams shard by shard: each dense tensor goes into its parameter, each expert tensor into
its compute weight (cast) and, at full precision, into its record in pinned host memory or on NVMe.
So neither the GPU nor the host ever holds an fp32 copy of every expert: the GPU holds what training
holds (bf16 experts), the host holds about one shard plus the store itself.

With ``resident_weights: no`` the experts' compute weights are loaded into host memory instead and handed
to an :class:`~moetrain.offload.weight_pager.ExpertWeightPager` (``store.pager``): no expert weight is
ever allocated on the GPU, which is the point of paging them.

:func:`random_into_tiers` does the same for a seeded random initialisation (no checkpoint): each expert tensor is
drawn in fp32 on the device, one at a time, and goes the same two ways.

The optimizer is then built on the same store (:func:`moetrain.offload.build_optimizer` ``store=``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.offload.config import OffloadPlan
from moetrain.offload.store import ExpertStore


def load_into_tiers(path: str | Path, offload: OffloadPlan, device: torch.device,
                    *, progress: Optional[bool] = None, train: Any = None) -> tuple[MoEForCausalLM, ExpertStore]:
    """(model in train mode on ``device``, its expert store with every master written) from ``path``.

    ``progress``: report the store filling on stderr (None: for stores of 1 GiB or more; see
    :class:`~moetrain.offload.store.ExpertStore`). ``train``: the ``model.train`` selection, applied to the empty
    model before the store is laid out, so that frozen experts get no record (their weights load into the model,
    or the pager); the caller applies it again to the loaded model (requires_grad is already as it says).

    Raises:
        ConfigError / ShardError: as :func:`moetrain.from_pretrained` (names the file and tensor).
    """
    from moetrain.models.hf import load_config, load_weights

    return _staged(load_config(path), offload, device, lambda model, sink: load_weights(model, path, expert_sink=sink),
                   progress=progress, train=train)


def random_into_tiers(config: ModelConfig, seed: int, offload: OffloadPlan, *, device: torch.device,
                      progress: Optional[bool] = None, train: Any = None,
                      announce: bool = False) -> tuple[MoEForCausalLM, ExpertStore]:
    """(model in train mode on ``device``, its expert store with every master written): the seeded random
    initialisation :func:`~moetrain.models.random_init.build_random` gives on ``device``, with the experts' masters
    streamed into their tier as :func:`load_into_tiers` streams a checkpoint's. The device holds the fp32 dense part,
    the experts' compute weights and one expert tensor in fp32 at a time: Mixtral-8x7B builds in 90 GiB of an H200
    where its fp32 model (174 GiB) does not fit. ``progress``, ``train``: as :func:`load_into_tiers`; ``announce``:
    as ``build_random``'s.
    """
    from moetrain.models.random_init import fill_random_

    def fill(model: MoEForCausalLM, sink: Any) -> None:
        fill_random_(model, seed, announce=announce, expert_sink=sink)

    return _staged(config, offload, device, fill, progress=progress, train=train)


def _staged(config: ModelConfig, offload: OffloadPlan, device: torch.device, fill: Any, *,
            progress: Optional[bool], train: Any) -> tuple[MoEForCausalLM, ExpertStore]:
    """The empty model (fp32 dense part, experts in their compute dtype, on the device or, paged, in host memory)
    and its store; ``fill(model, sink)`` gives the model its values and ``sink(name, value)`` every expert master."""
    from moetrain.models.hf import empty_model
    from moetrain.offload.compute_weights import compute_dtype

    paged = offload.resident_weights == "no"
    dtype = compute_dtype(offload, device)
    model = empty_model(config, dtype=torch.float32, device=device, expert_dtype=dtype,
                        expert_device="cpu" if paged else None)
    if train is not None:
        from moetrain.models.train_selection import apply_train_selection

        for hook in apply_train_selection(model, train).hooks:  # the caller's own application installs them
            hook.remove()
    store = ExpertStore(model, offload, pin=device.type == "cuda", initialise=False, progress=progress)
    try:
        fill(model, store.write_master)
        store.finish_staged()
        if paged:
            from moetrain.offload.weight_pager import ExpertWeightPager

            store.pager = ExpertWeightPager(model.moe_blocks(), device, dtype)
            model.attach_offload(weights=store.pager)
    except BaseException:
        store.close()
        raise
    return model.train(), store


@torch.no_grad()
def restore_masters(model: MoEForCausalLM, store: ExpertStore) -> None:
    """Give every routed expert parameter its fp32 master from ``store`` (on the parameter's device) and
    close the store: the model is then as :func:`moetrain.from_pretrained` would have loaded it."""
    for rec in store:
        for p, master in zip(rec.params, store.master_weights(rec), strict=True):
            p.data = master.to(p.device)
    for fx in store.frozen.values():  # frozen experts have no master: their weights, in fp32 as the rest
        for p in fx.params:
            p.data = p.data.float()
    store.close()
