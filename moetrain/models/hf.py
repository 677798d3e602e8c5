"""Load Hugging Face checkpoints of the supported MoE families into :class:`MoEForCausalLM`, and export back.

Loading streams: the model is built on the meta device, materialised empty in the target dtype, and
each tensor is copied into its parameter as its shard is read, so no full state dict is ever held.
Both on-disk expert layouts are accepted:

* per expert (what every published checkpoint and transformers' ``save_pretrained`` write):
  ``model.layers.{i}.mlp.experts.{e}.gate_proj.weight`` (I, H) ... (Mixtral: ``block_sparse_moe``
  and ``w1``/``w3``/``w2``);
* fused (transformers-5's in-memory layout, e.g. a raw ``save_file(model.state_dict())``):
  ``model.layers.{i}.mlp.experts.gate_up_proj`` (E, 2I, H) with gate rows first, and
  ``model.layers.{i}.mlp.experts.down_proj`` (E, H, I).

Export writes the family's per-expert layout with ``config.json`` (see :mod:`moetrain.models.hf_configs`)
and ``moetrain_config.json``, which keeps the fields no config.json can hold (the router z-loss, the name).
A family transformers has no class for (DeepSeek-MoE v1) also gets its modelling files
(:mod:`moetrain.models.hf_code`), which config.json's ``auto_map`` names, so the export loads with
``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``.
A moetrain checkpoint directory has the same layout, so :func:`from_pretrained` loads both, and a run
directory too (its newest complete checkpoint, ``checkpoints/last``).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional, Union

import torch

from moetrain.config import ConfigError, ModelConfig
from moetrain.models import keymap
from moetrain.models.decoder import MoEForCausalLM
from moetrain.models.hf_configs import REMOTE_CODE, config_from_hf, config_to_hf, remote_code_files
from moetrain.models.rope import rotary_for
from moetrain.progress import shard_progress
from moetrain.shards import ShardError, iter_shard_tensors, read_weight_map, write_sharded

MOETRAIN_CONFIG = "moetrain_config.json"
HF_CONFIG = "config.json"
CHECKPOINTS_DIR = "checkpoints"
LAST_FILE = "last"
"""A run directory keeps its checkpoints in ``CHECKPOINTS_DIR/step-<N>``; ``CHECKPOINTS_DIR/LAST_FILE`` names the
newest complete one."""

# transformers-5 fused experts; older exports may still say block_sparse_moe (Mixtral).
_FUSED_RE = re.compile(
    r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)(?:\.weight)?$"
)
# Tensors some checkpoints carry that are recomputed here, never loaded.
_IGNORED_RE = re.compile(r"\.rotary_emb\.inv_freq$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# Tensors written in fp32 whatever the export dtype (transformers keeps them fp32 too): DeepSeek-V3's routing
# bias moves by ~1e-3 per step, which bf16 would round away.
_KEEP_FP32_RE = re.compile(r"\.e_score_correction_bias$")


def _is_mtp_tensor(config: ModelConfig, name: str) -> bool:
    """DeepSeek-V3 checkpoints append multi-token-prediction modules as layers past ``num_hidden_layers``; the
    causal LM does not use them (transformers skips them too)."""
    m = _LAYER_RE.match(name) if config.family == "deepseek_v3" else None
    return m is not None and int(m.group(1)) >= config.num_hidden_layers

DType = Union[torch.dtype, str]


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Copied next to the weights by ``moetrain export`` when the source has them (checkpoints carry the run's tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "generation_config.json")


def _as_dtype(dtype: DType) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    resolved = getattr(torch, _DTYPE_ALIASES.get(name, name), None)
    if not isinstance(resolved, torch.dtype):
        raise ConfigError(f"dtype={dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    return resolved


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from None


def load_config(path: str | Path) -> ModelConfig:
    """The model config of a model directory: ``moetrain_config.json`` when present, else ``config.json``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist; pass a Hugging Face model directory, a moetrain checkpoint "
                          "(runs/NAME/checkpoints/step-N) or a run directory")
    if not path.is_dir():
        raise ConfigError(f"{path}: not a directory; pass a Hugging Face model directory or a moetrain checkpoint")
    if (path / MOETRAIN_CONFIG).exists():
        return ModelConfig.load(path / MOETRAIN_CONFIG)
    if (path / HF_CONFIG).exists():
        return config_from_hf(_read_json(path / HF_CONFIG), source=str(path / HF_CONFIG), name=path.name)
    raise ConfigError(f"{path}: neither {MOETRAIN_CONFIG} nor {HF_CONFIG} found; is this a model directory?")


# ---------------------------------------------------------------------------------------------- model skeleton
def empty_model(
    config: ModelConfig, dtype: DType = torch.float32, device: str | torch.device = "cpu",
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
    model = model.to(dtype=_as_dtype(dtype))
    if expert_dtype is not None:
        for block in model.moe_blocks():
            block.experts.to(dtype=_as_dtype(expert_dtype))
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


# ---------------------------------------------------------------------------------------------- reading
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


def resolve_model_path(path: str | Path) -> Path:
    """The model directory that ``path`` names: a run directory (or its ``checkpoints/last`` pointer file) stands
    for its newest complete checkpoint; any other path is returned as it is.

    Raises:
        ConfigError: a run directory without a complete checkpoint, or a ``last`` naming a missing directory.
    """
    path = Path(path)
    pointer = path / "checkpoints" / "last"
    if path.is_dir() and pointer.is_file():
        path = pointer
    if path.is_file() and path.name == "last":
        target = path.parent / path.read_text().strip()
        if not target.is_dir():
            raise ConfigError(f"{path} names {target.name!r}, which is not a directory; the run has no complete "
                              "checkpoint (pass an existing checkpoints/step-<N> directory)")
        return target
    if (path / "checkpoints").is_dir() and not any((path / n).is_file() for n in (HF_CONFIG, MOETRAIN_CONFIG)):
        raise ConfigError(f"{path} is a run directory without a complete checkpoint (no checkpoints/last yet); let "
                          "the run save one, or pass a checkpoints/step-<N> directory")
    return path


def resolve_checkpoint(path: str | Path, run_dir: str | Path) -> Path:
    """The checkpoint directory named by ``--ckpt_path``: ``last`` reads ``<run_dir>/checkpoints/last``; a run
    directory stands for its own ``checkpoints/last``.

    Raises:
        ConfigError: the path does not exist, nothing to resume from, or the directory is incomplete.
    """
    if str(path) == "last":
        pointer = Path(run_dir) / CHECKPOINTS_DIR / LAST_FILE
        if not pointer.is_file():
            raise ConfigError(f"--ckpt_path=last: {pointer} not found; no complete checkpoint in run directory "
                              f"{run_dir} (check --trainer.default_root_dir, or drop --ckpt_path to start fresh)")
        ckpt = pointer.parent / pointer.read_text().strip()
        if not ckpt.is_dir():
            raise ConfigError(f"--ckpt_path=last: {pointer} names {ckpt.name!r}, but {ckpt} does not exist (deleted "
                              "or moved?); pass an existing checkpoints/step-<N> directory instead")
    else:
        ckpt = Path(path)
        if not ckpt.exists():
            raise ConfigError(f"--ckpt_path={path}: {ckpt} does not exist; pass a run directory, one of its "
                              "checkpoints/step-<N> directories, or 'last' with --trainer.default_root_dir set to "
                              "the run directory")
        if (ckpt / CHECKPOINTS_DIR / LAST_FILE).is_file():  # a run directory
            return resolve_checkpoint("last", ckpt)
    if not (ckpt / MOETRAIN_CONFIG).is_file():
        raise ConfigError(f"--ckpt_path: {ckpt} is not a complete moetrain checkpoint (no {MOETRAIN_CONFIG}); "
                          "pass a checkpoints/step-<N> directory or 'last'")
    return ckpt


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


# ---------------------------------------------------------------------------------------------- writing
def hf_named_tensors(model: MoEForCausalLM, dtype: Optional[DType] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(Hugging Face name, CPU tensor)`` in the family's per-expert layout, one tensor at a time.

    A tied ``lm_head.weight`` is left out, as transformers' ``save_pretrained`` does.
    """
    family = model.config.family
    cast = None if dtype is None else _as_dtype(dtype)
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        out = tensor.detach()
        if cast is not None and not _KEEP_FP32_RE.search(name):
            out = out.to(cast)
        yield keymap.to_hf_name(family, name), out.cpu()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_model_code(config: ModelConfig, out_dir: Path) -> list[str]:
    """Copy the modelling files that the family's ``auto_map`` names into ``out_dir`` (DeepSeek-MoE v1, which
    transformers does not ship); returns their names (none for the other families)."""
    names = remote_code_files(config.family)
    if names:
        package = importlib.resources.files("moetrain.models.hf_code") / REMOTE_CODE[config.family][0]
        for name in names:
            (out_dir / name).write_bytes((package / name).read_bytes())
    return names


def export_hf(
    model: MoEForCausalLM,
    out_dir: str | Path,
    dtype: Optional[DType] = None,
    max_shard_bytes: int = 5 * 2**30,
) -> dict[str, str]:
    """Write ``model`` as a Hugging Face directory of its family (sharded safetensors, index, config.json).

    Also writes ``moetrain_config.json`` so that :func:`from_pretrained` restores the exact config, and the
    family's modelling files when transformers has no class for it (:func:`write_model_code`).
    Returns the weight map {tensor name: shard file}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    if dtype is None:
        dtype = next(model.parameters()).dtype
    torch_dtype = str(_as_dtype(dtype)).removeprefix("torch.")
    # refuse an unexportable config before writing
    hf_config = config_to_hf(config, torch_dtype=torch_dtype, with_code=True)
    weight_map = write_sharded(hf_named_tensors(model, dtype), out_dir, max_shard_bytes=max_shard_bytes)
    write_model_code(config, out_dir)
    _write_json(out_dir / HF_CONFIG, hf_config)
    _write_json(out_dir / MOETRAIN_CONFIG, config.to_dict())
    return weight_map


def state_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{internal state-dict name: shape} of ``config``'s model, computed on the meta device (no memory)."""
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def convert_checkpoint(
    src: str | Path, out_dir: str | Path, dtype: Optional[DType] = None, max_shard_bytes: int = 5 * 2**30
) -> dict[str, str]:
    """Re-write a model directory (Hugging Face or moetrain checkpoint, either expert layout) as a Hugging Face
    directory of its family, streaming tensor by tensor: the model is never built in memory.

    ``config.json`` and ``moetrain_config.json`` are written last, so an export that fails midway (a missing
    tensor, a full disk) leaves no directory that looks loadable. A family transformers has no class for also
    gets its modelling files (:func:`write_model_code`), which config.json's ``auto_map`` names.
    """
    src, out_dir = Path(src), Path(out_dir)
    config = load_config(src)
    shapes = state_shapes(config)
    cast = None if dtype is None else _as_dtype(dtype)
    hf_config = config_to_hf(config, with_code=True)  # refuse an unexportable config before writing anything

    stored: list[torch.dtype] = []

    def renamed() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in checked_tensors(src, config, shapes):
            if not stored:
                stored.append(tensor.dtype)
            keep = cast is None or _KEEP_FP32_RE.search(name)
            yield keymap.to_hf_name(config.family, name), tensor if keep else tensor.to(cast)

    weight_map = write_sharded(renamed(), out_dir, max_shard_bytes=max_shard_bytes)
    hf_config["torch_dtype"] = str(cast or stored[0]).removeprefix("torch.")
    write_model_code(config, out_dir)
    _write_json(out_dir / HF_CONFIG, hf_config)
    _write_json(out_dir / MOETRAIN_CONFIG, config.to_dict())
    return weight_map


def export_main(argv: list[str]) -> int:
    """``moetrain export --ckpt SOURCE --out OUT_DIR [--dtype bf16] [--max-shard-mb N]`` (or SOURCE OUT_DIR as
    positional arguments); returns the exit status."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="moetrain export",
        description="Write a moetrain checkpoint (or any supported model directory) as a Hugging Face model "
                    "directory of its family: per-expert safetensors shards, index and config.json.")
    parser.add_argument("source", type=Path, nargs="?", help="checkpoint directory, run directory (uses "
                        "checkpoints/last), or Hugging Face model directory (same as --ckpt)")
    parser.add_argument("out_dir", type=Path, nargs="?", help="new directory to write (must not exist or be empty; "
                        "same as --out)")
    parser.add_argument("--ckpt", type=Path, default=None, help="the source, as the positional SOURCE")
    parser.add_argument("--out", type=Path, default=None, help="the output directory, as the positional OUT_DIR")
    parser.add_argument("--dtype", default=None, help="cast weights: bf16, fp16, fp32 or a torch dtype name "
                        "(default: keep the stored dtype)")
    parser.add_argument("--max-shard-mb", type=int, default=5 * 1024, help="largest shard size in MiB")
    args = parser.parse_args(argv)
    args.source, args.out_dir = args.ckpt or args.source, args.out or args.out_dir
    if args.source is None or args.out_dir is None:
        parser.error("pass the checkpoint (--ckpt DIR) and the output directory (--out HF_DIR)")
    try:
        source = resolve_model_path(args.source)
        if args.out_dir.exists() and any(args.out_dir.iterdir()):
            raise ConfigError(f"{args.out_dir} exists and is not empty; choose a new output directory")
        weight_map = convert_checkpoint(source, args.out_dir, dtype=args.dtype,
                                        max_shard_bytes=args.max_shard_mb * 2**20)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                (args.out_dir / name).write_bytes((source / name).read_bytes())
    except (ConfigError, ShardError, OSError) as err:
        print(f"moetrain export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(weight_map)} tensors in {len(set(weight_map.values()))} shard(s) to {args.out_dir}")
    print(load_hint(load_config(args.out_dir), args.out_dir))
    return 0


def load_hint(config: ModelConfig, out_dir: Path) -> str:
    """How to load an export of ``config``'s family in transformers (printed by ``moetrain export``)."""
    if config.family in REMOTE_CODE:
        code = " and ".join(remote_code_files(config.family))
        return (f"load it in transformers with AutoModelForCausalLM.from_pretrained({str(out_dir)!r}, "
                f"trust_remote_code=True): transformers has no {config.family} class, so the model's code is in "
                f"{code} next to the weights")
    return f"load it in transformers with AutoModelForCausalLM.from_pretrained({str(out_dir)!r})"
