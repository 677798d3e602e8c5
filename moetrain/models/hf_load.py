"""Loading Hugging Face checkpoints of the supported MoE families (and moetrain's own) into
:class:`~moetrain.models.decoder.MoEForCausalLM`, streaming.

The model is built on the meta device, materialised empty in the target dtype, and each tensor is copied into
its parameter as its shard is read, so no full state dict is ever held. Both on-disk expert layouts are accepted:

* per expert (what every published checkpoint and transformers' ``save_pretrained`` write):
  ``model.layers.{i}.mlp.experts.{e}.gate_proj.weight`` (I, H) ... (Mixtral: ``block_sparse_moe``
  and ``w1``/``w3``/``w2``);
* fused (transformers-5's in-memory layout, e.g. a raw ``save_file(model.state_dict())``):
  ``model.layers.{i}.mlp.experts.gate_up_proj`` (E, 2I, H) with gate rows first, and
  ``model.layers.{i}.mlp.experts.down_proj`` (E, H, I).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import torch

from moetrain.config import ModelConfig
from moetrain.models import keymap
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf_files import DType, as_dtype, load_config, resolve_model_path
from moetrain.models.rope import rotary_for
from moetrain.progress import shard_progress
from moetrain.shards import ShardError, iter_shard_tensors, read_weight_map

# transformers-5 fused experts; older exports may still say block_sparse_moe (Mixtral).
_FUSED_RE = re.compile(
    r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)(?:\.weight)?$"
)
# Tensors some checkpoints carry that are recomputed here, never loaded.
_IGNORED_RE = re.compile(r"\.rotary_emb\.inv_freq$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def _is_mtp_tensor(config: ModelConfig, name: str) -> bool:
    """DeepSeek-V3 checkpoints append multi-token-prediction modules as layers past ``num_hidden_layers``; the
    causal LM does not use them (transformers skips them too)."""
    m = _LAYER_RE.match(name) if config.family == "deepseek_v3" else None
    return m is not None and int(m.group(1)) >= config.num_hidden_layers


def empty_model(
    config: ModelConfig, dtype: DType = torch.float32, device: str | torch.device = "cpu", *,
    expert_dtype: Optional[DType] = None, expert_device: Optional[str | torch.device] = None,
) -> MoEForCausalLM:
    """A model with uninitialised weights of ``dtype`` on ``device``, built without a first fp32 allocation.

    ``expert_dtype``: another dtype for the routed experts' weights (their compute dtype when an offload
    tier keeps their fp32 masters elsewhere); ``expert_device``: another device for them (host memory, when
    their compute weights are paged from there). Non-persistent buffers (the rotary ``inv_freq``) are
    recomputed in fp32, as the HF families keep them.
    """
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    model = model.to(dtype=as_dtype(dtype))
    if expert_dtype is not None:
        for block in model.moe_blocks():
            block.experts.to(dtype=as_dtype(expert_dtype))
    if expert_device is None:
        model = model.to_empty(device=device)
    else:  # module by module, so that no expert weight is ever allocated on ``device``
        experts = {id(m) for block in model.moe_blocks() for m in block.experts.modules()}
        for module in model.modules():
            module.to_empty(device=expert_device if id(module) in experts else device, recurse=False)
    if config.tie_word_embeddings:
        # to_empty gives each module its own tensor; re-tie.
        model.lm_head.weight = model.model.embed_tokens.weight
    fresh = rotary_for(config)
    model.model.rotary.register_buffer("inv_freq", fresh.inv_freq.to(device), persistent=False)
    return model



def iter_checkpoint(model_dir: str | Path) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """Yield ``(shard path, on-disk name, tensor)`` for every tensor, one shard open at a time (with a
    per-shard progress bar on a terminal: imports, resumes and exports all read through here)."""
    shards = len(set(read_weight_map(model_dir).values()))
    return shard_progress(iter_shard_tensors(model_dir), shards, f"load {Path(model_dir).name}")


def _internal_tensors(family: str, name: str, tensor: torch.Tensor, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Map one on-disk tensor to the internal ``(name, tensor)`` pairs it holds (several for fused experts)."""
    m = _FUSED_RE.match(name)
    if m is None:
        yield keymap.from_hf_name(family, name), tensor
        return
    prefix, kind = m.group(1), m.group(2)
    if tensor.dim() != 3:
        raise ShardError(f"{path}: fused expert tensor {name!r} has shape {tuple(tensor.shape)}; expected 3 dims "
                         "(experts, out, in)")
    for e in range(tensor.shape[0]):
        base = f"{prefix}.mlp.experts.{e}"
        if kind == "gate_up_proj":  # (E, 2I, H): gate rows then up rows, as transformers' chunk(2) reads them
            gate, up = tensor[e].chunk(2, dim=0)
            yield f"{base}.gate_proj.weight", gate
            yield f"{base}.up_proj.weight", up
        else:  # (E, H, I)
            yield f"{base}.down_proj.weight", tensor[e]


def checked_tensors(
    model_dir: str | Path, config: ModelConfig, shapes: dict[str, tuple[int, ...]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream a checkpoint as ``(internal name, tensor)``, checked against the model's ``shapes``.

    ``shapes`` maps every internal state-dict name to its shape. A tied ``lm_head.weight`` on disk is skipped
    (``embed_tokens`` is authoritative, as in transformers).

    Raises:
        ShardError: an unexpected tensor or a shape mismatch (both name the shard and tensor), a tensor given
            twice, or, once the stream is exhausted, tensors the model needs that no shard holds.
    """
    model_dir = Path(model_dir)
    family, tied = config.family, config.tie_word_embeddings
    seen: set[str] = set()
    for path, disk_name, tensor in iter_checkpoint(model_dir):
        if _IGNORED_RE.search(disk_name) or _is_mtp_tensor(config, disk_name):
            continue
        for name, value in _internal_tensors(family, disk_name, tensor, path):
            if tied and name == "lm_head.weight":
                continue
            shape = shapes.get(name)
            if shape is None:
                raise ShardError(f"{path}: unexpected tensor {disk_name!r} (maps to {name!r}); the checkpoint does "
                                 f"not match the {family} config in {model_dir}")
            if tuple(shape) != tuple(value.shape):
                raise ShardError(f"{path}: tensor {disk_name!r} has shape {tuple(value.shape)} but the config in "
                                 f"{model_dir} needs {tuple(shape)} for {name!r}")
            if name in seen:
                raise ShardError(f"{path}: tensor {disk_name!r} provides {name!r} a second time")
            seen.add(name)
            yield name, value
    missing = sorted(set(shapes) - seen - ({"lm_head.weight"} if tied else set()))
    if missing:
        shown = ", ".join(keymap.to_hf_name(family, n) for n in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ShardError(f"{model_dir}: the checkpoint lacks {len(missing)} tensor(s) the model needs: {shown}{more}")


@torch.no_grad()
def load_weights(model: MoEForCausalLM, model_dir: str | Path,
                 expert_sink: Optional[Callable[[str, torch.Tensor], None]] = None) -> None:
    """Copy a checkpoint's tensors into ``model`` shard by shard (casting to each parameter's dtype).

    ``expert_sink(name, tensor)`` also receives every routed expert's weight as read (before any cast):
    the offload store takes its master weights there, straight from the file. When the experts' compute
    weights are paged (their parameters are placeholders), the sink alone receives them.

    Raises:
        ShardError: see :func:`checked_tensors`.
    """
    targets = model.state_dict(keep_vars=True)
    shapes = {name: tuple(t.shape) for name, t in targets.items()}
    experts = model.expert_parameter_names() if expert_sink is not None else set()
    paged = expert_sink is not None and any(getattr(b.experts, "pager", None) is not None for b in model.moe_blocks())
    for name, value in checked_tensors(model_dir, model.config, shapes):
        if not (paged and name in experts):
            targets[name].copy_(value)
        if name in experts:
            expert_sink(name, value)



def from_pretrained(
    path: str | Path, dtype: DType = torch.float32, device: str | torch.device = "cpu"
) -> MoEForCausalLM:
    """Load a Hugging Face model directory of a supported family, a moetrain checkpoint directory, or a run
    directory (its newest complete checkpoint, named by ``checkpoints/last``).

    Args:
        path: directory with ``config.json`` (and/or ``moetrain_config.json``, preferred) and
            ``model.safetensors`` or ``model.safetensors.index.json`` with its shards; or a run directory
            (``trainer.default_root_dir``) holding ``checkpoints/last``.
        dtype: parameter dtype of the returned model.
        device: where the parameters live.

    Raises:
        ConfigError: a missing directory, a run without a checkpoint, a missing/unsupported config (names the
            key).
        ShardError: missing, unexpected or mis-shaped tensors (names the file and tensor).
    """
    path = resolve_model_path(path)
    config = load_config(path)
    model = empty_model(config, dtype=dtype, device=device)
    load_weights(model, path)
    return model.eval()



def state_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{internal state-dict name: shape} of ``config``'s model, computed on the meta device (no memory)."""
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}
