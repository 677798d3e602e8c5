"""Checks of a parsed ``fit``/``validate`` configuration that run before anything is built.

Building a real model takes minutes (DeepSeek-MoE-16B: about three), and so does loading ``init_from``;
a wrong value found after that wastes them. :func:`check_config` runs on the parsed configuration, after
jsonargparse has checked every key's spelling and type and before any class is built, and fails on the
first problem with a :class:`~moetrain.config.ConfigError` (or a :class:`~moetrain.training.data.DataError`,
:class:`~moetrain.shards.ShardError`) whose message names the key and what to do; the CLI prints it as
one paragraph and exits with status 2. In order:

1. The cheap sections are built once, by their own classes, and thrown away: ``data`` (its files and
   choices), ``checkpoint``, ``metrics``, ``progress``, ``parallel``, ``model.optimizer`` and
   ``model.offload``. Their constructors hold the rules, so the check and the real run cannot disagree.
2. The tokenizer directory loads, and the model's shape is known without building it: ``model.preset``
   with ``model.config``, or ``model.init_from`` (it exists, has a config of a supported family, and its
   safetensors shards are whole); the tokenizer's vocabulary fits the model's.
3. ``--ckpt_path`` names a complete checkpoint.
4. Resources, from the memory planner (:mod:`moetrain.offload.plan`) when an offload store will be built:
   swap files that dead processes left in ``model.offload.nvme.path`` are deleted (and reported); the
   folder exists, is writable and has room for the swap; host memory holds what the plan pins there
   (and, without a GPU, the model, its gradients and optimizer state); ``gpu_budget_gb`` holds one expert.
   A CPU share's AdamW (``model.offload.schedule.cpu_adam: exact``) is compiled here (a C compiler is needed).

:func:`prepare_data` then reads, tokenizes and packs the data with the data module's own code (a split too small for
one row of ``data.seq_len``, or a malformed record, fails here, not after the model build); the CLI hands the
prepared data module to the one it instantiates (:meth:`~moetrain.training.data.TextDataModule.adopt`), so the data
is tokenized once.

:func:`check_trainer` builds a throwaway Lightning ``Trainer`` from the ``trainer`` section (Lightning's
own value checks, e.g. ``max_steps >= -1``); it raises what Lightning raises, and the CLI names the key.

What cannot be known before the run (the GPU's activation peak is an estimate) can still run out while it
trains: :func:`resource_error_message` turns running out of GPU, host or pinned memory or disk into one
paragraph naming the settings to change.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

from moetrain.config import ConfigError, ModelConfig

GiB = 2**30
MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (or a nested one) as plain dicts."""
    as_dict = getattr(value, "as_dict", None)
    return as_dict() if callable(as_dict) else value


def _build(what: str, make: Callable[[], Any]) -> Any:
    """``make()``, with a plain ValueError/TypeError of a constructor turned into a ConfigError naming ``what``."""
    from moetrain.training.data import DataError

    try:
        return make()
    except (ConfigError, DataError):
        raise
    except (ValueError, TypeError) as err:
        reason = " ".join(str(err).split()).rstrip(".")
        if not reason.startswith(what):
            reason = f"{what}: {reason}"
        raise ConfigError(f"invalid configuration: {reason}. Fix that key in the recipe or on the command "
                          "line.") from None


# ---------------------------------------------------------------------------------------------- the checks
def check_config(config: Any, subcommand: str, cuda: Optional[bool] = None) -> None:
    """Check a parsed ``fit``/``validate`` configuration (the subcommand's Namespace, or plain dicts) before
    anything is built.

    Args:
        config: the sections (``trainer``, ``model``, ``data``, ``checkpoint``, ``metrics``, ``progress``,
            ``parallel``, ``ckpt_path``) after parsing.
        subcommand: ``fit`` or ``validate`` (only ``fit`` builds an optimizer, and so the offload store, unless
            ``init_from``, or a large random initialisation, streams the experts' masters into their tier).
        cuda: whether the run computes on a GPU (None: ``trainer.accelerator`` and what this machine has).

    Raises:
        ConfigError, DataError, ShardError: naming the key, file or setting and what to do.
    """
    sections = {key: _plain(value) for key, value in dict(_plain(config)).items()}
    _check_sections(sections)
    tokenizer = _check_tokenizer(sections["data"])
    model = sections["model"]
    from moetrain.offload.config import OffloadSettings, resolve
    from moetrain.optim import OptimizerConfig

    _build("model.optimizer", lambda: OptimizerConfig(**(model.get("optimizer") or {})))
    # the section resolved as the training module resolves it: every rule of the section checked once, in resolve
    offload = _build("model.offload", lambda: resolve(OffloadSettings.from_dict(model.get("offload"))))
    _check_cpu_adam(offload, subcommand)
    model_config = _check_model(model)
    if tokenizer.vocab_size > model_config.vocab_size:
        # the training module checks the same in setup(), after the build, for library use
        raise ConfigError(f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's "
                          f"vocab_size is {model_config.vocab_size}; use a matching tokenizer or set "
                          f"model.config.vocab_size >= {tokenizer.vocab_size}")
    trainer = sections.get("trainer") or {}
    _check_resume(sections.get("ckpt_path"), trainer.get("default_root_dir"), subcommand)
    if cuda is None:
        import torch

        cuda = trainer.get("accelerator") not in ("cpu",) and torch.cuda.is_available()
    check_resources(sections, subcommand, model_config, offload=offload, cuda=cuda)


def _check_cpu_adam(offload: Any, subcommand: str) -> None:
    """A run with a CPU share (``step_on`` cpu or auto) and ``cpu_adam: exact`` compiles that AdamW now (about a
    second the first time, cached after), so a missing C compiler is found before the build, not after it."""
    if subcommand != "fit" or offload.tier == "none" or offload.step_on == "gpu" or offload.cpu_adam != "exact":
        return
    from moetrain.offload.adam_cuda_order import BuildError, build

    try:
        build()
    except BuildError as err:
        raise ConfigError(f"model.offload.schedule.cpu_adam=exact (step_on {offload.step_on}): {err} Or set "
                          "model.offload.schedule.step_on=gpu, which steps every expert on the GPU.") from None


def _check_sections(sections: dict[str, Any]) -> None:
    """Build each cheap section once with its own class (the checks live in their constructors)."""
    from moetrain.parallel.config import ParallelConfig
    from moetrain.training.callbacks import MetricsLogger
    from moetrain.training.checkpoint_callback import CheckpointCallback
    from moetrain.training.data import TextDataModule
    from moetrain.training.progress import StepProgress
    from moetrain.training.step_profiler import StepProfiler

    for key, cls in (("data", TextDataModule), ("checkpoint", CheckpointCallback), ("metrics", MetricsLogger),
                     ("progress", StepProgress), ("profile", StepProfiler),
                     ("parallel", ParallelConfig)):
        values = sections.get(key)
        if values is not None:
            _build(key, lambda cls=cls, values=values: cls(**values))


def prepare_data(data: Any, subcommand: str) -> Any:
    """Build the ``data`` section's data module and prepare the splits ``subcommand`` uses, as its ``setup`` would.

    Returns:
        the prepared :class:`~moetrain.training.data.TextDataModule`, for the CLI to pass to the data module it
        instantiates (:meth:`~moetrain.training.data.TextDataModule.adopt`) instead of tokenizing the data again.

    Raises:
        DataError: naming the file or setting (e.g. a split holding fewer tokens than one row of ``data.seq_len``).
    """
    from moetrain.training.data import TextDataModule

    values = _plain(data)
    module = _build("data", lambda: TextDataModule(**values))
    module.prepare(subcommand)
    return module


def _check_tokenizer(data: dict[str, Any]) -> Any:
    from moetrain.training.tokenizer import load_tokenizer

    return load_tokenizer(data["tokenizer"])


def _check_model(model: dict[str, Any]) -> ModelConfig:
    """The model's shape, from the preset and its overrides or from ``init_from``, without building it."""
    init_from = model.get("init_from")
    if init_from is None:
        return _build("model.config", lambda: ModelConfig.from_preset(model["preset"], **(model.get("config") or {})))
    if model.get("config"):
        raise ConfigError("model.config overrides cannot be combined with model.init_from (the checkpoint fixes "
                          "the shape); remove model.config")
    return check_init_from(init_from)


def check_init_from(init_from: str) -> ModelConfig:
    """``model.init_from`` names a model directory of a supported family (or a moetrain checkpoint, or a run
    directory with one) whose safetensors shards are whole; returns its model config.

    Raises:
        ConfigError: missing, not a model directory, or an unsupported family. ShardError: a missing or truncated
            shard, or an index naming a tensor its shard lacks.
    """
    from moetrain.models.hf import load_config, resolve_model_path
    from moetrain.training.checkpoint import verify_shards

    if not Path(init_from).exists():
        raise ConfigError(f"model.init_from={init_from} does not exist; download the model there (a Hugging Face "
                          "model directory: config.json and model*.safetensors) or point model.init_from at one "
                          "(a moetrain checkpoint or run directory works too)")
    try:
        directory = resolve_model_path(init_from)
        config = load_config(directory)
    except ConfigError as err:
        raise ConfigError(f"model.init_from: {err}") from None
    verify_shards(directory, "model")
    return config


def _check_resume(ckpt_path: Optional[str], run_dir: Optional[str], subcommand: str) -> None:
    if ckpt_path is None:
        return
    from moetrain.models.hf import resolve_checkpoint
    from moetrain.training.checkpoint import verify_checkpoint

    ckpt = resolve_checkpoint(ckpt_path, run_dir or os.getcwd())
    verify_checkpoint(ckpt, optimizer=subcommand == "fit")  # validate reads only the weights


# ---------------------------------------------------------------------------------------------- resources
def check_resources(sections: dict[str, Any], subcommand: str, model_config: ModelConfig, *, offload: Any,
                    cuda: bool) -> None:
    """Swap folder, disk, host memory and the GPU's load peak for the run, from the memory planner.

    Stale swap files in ``nvme_path`` are deleted first (their space then counts as free). The swap's folder
    and free space are checked when the plan puts expert state on NVMe. Host memory is checked against what the
    plan puts there besides its reserve for the process (:data:`~moetrain.offload.plan.HOST_RESERVE`): the
    pinned expert state and staging buffers, and, on a machine without a GPU, the model, its gradients and
    optimizer state too; the memory available now (``MemAvailable``, and the container's limit) must hold it. A
    ``fit`` on a GPU is refused when the plan's GPU peak at load (weights only) is past the card's memory.

    Raises:
        NvmeError, ConfigError: naming ``model.offload.*`` (or the model's size) and what to do.
    """
    from moetrain.offload import nvme
    from moetrain.offload.plan import GPU_RESERVE, HOST_RESERVE, make_plan, recipe_training
    from moetrain.offload.plan.memory import random_init_in_host_memory
    from moetrain.offload.schedule import num_state_slots

    if offload.nvme_path and Path(offload.nvme_path).is_dir():
        nvme.remove_stale_swap_files(offload.nvme_path)
    # the build fills a store for init_from, and for a large random initialisation (model_build.random_model)
    streams = bool(sections["model"].get("init_from")) or \
        not random_init_in_host_memory(model_config.param_counts()["total"])
    builds_store = offload.tier != "none" and (subcommand == "fit" or streams)
    if not builds_store and subcommand != "fit":
        return
    if os.environ.get("LOCAL_RANK", "0") != "0":
        # the other ranks of a run start after the first one passed these checks; planning here would also make
        # each of them open a CUDA context on the first GPU (the planner asks it for its capacity)
        return
    plan = make_plan(model_config, offload, **recipe_training(sections))
    if cuda and subcommand == "fit":
        _check_gpu_load(plan)
        if not builds_store:  # no tier on a GPU machine: host memory holds no model state to check
            return
    if builds_store:
        # a budget that holds no expert is refused here, before the build, by the rule the engine sizes its slots by
        num_state_slots(offload, record_bytes=plan.record_bytes, num_records=plan.total_experts)
    if builds_store and plan.nvme_bytes:
        if not offload.nvme_path:
            raise nvme.NvmeError(f"{plan.nvme_bytes / GiB:.2f} GiB of expert state exceed model.offload."
                                 f"placement.cpu_budget_gb={offload.cpu_budget_gb} and must go to NVMe: set "
                                 "model.offload.nvme.path=DIR (a folder on a fast local disk), or raise the budget")
        nvme.preflight(offload.nvme_path, plan.nvme_bytes)
    rows = [(what, n) for tier, what, n in plan.breakdown
            if (tier == "host" and n != HOST_RESERVE) or (not cuda and tier == "gpu" and n != GPU_RESERVE)]
    needed = sum(n for _, n in rows)
    available = available_host_memory()
    if available is None or needed <= available:
        return
    listed = ", ".join(f"{what} {n / GiB:.2f} GiB" for what, n in sorted(rows, key=lambda r: -r[1])[:4] if n)
    if not cuda:
        raise ConfigError(
            f"this run needs about {needed / GiB:.2f} GiB of host memory but {available / GiB:.2f} GiB are available "
            f"(without a GPU the model, its gradients and optimizer state live in host memory: {listed}). Train a "
            "smaller model (model.preset, model.config), lower data.micro_batch_size or data.seq_len, or run on a "
            "GPU machine; `moetrain plan --config RECIPE` shows the plan")
    raise ConfigError(
        f"the offload plan pins {needed / GiB:.2f} GiB of host memory ({listed}) but {available / GiB:.2f} GiB are "
        "available. Set model.offload.placement.cpu_budget_gb below the available memory so that the rest of the "
        "expert state goes to model.offload.nvme.path, store it compressed (model.offload.state.master=bf16_sr or "
        "bf16_kahan, model.offload.state.moments=bf16 or int8), or use model.offload.placement.tier=nvme; "
        "`moetrain plan --config RECIPE` shows the plan")


def _check_gpu_load(plan: Any) -> None:
    """Refuse a model whose build alone overflows the GPU: the load peak counts weights only (no activations, no
    estimate), so past the card's memory the build fails for certain, after minutes."""
    if plan.gpu_capacity is None or plan.gpu_load_bytes <= plan.gpu_capacity:
        return
    line = plan.load_lines()["gpu"].strip()
    fix = ("set model.offload.placement.resident_weights=no (the experts' compute weights then stay in host memory, "
           "paged onto the GPU)") if plan.streamed_load else (
        "set model.offload.placement.tier=cpu (the routed experts' masters then go to host memory as they are "
        "loaded or drawn, and only their bf16 compute weights are on the GPU)")
    raise ConfigError(f"the model does not fit the GPU while it is built ({plan.gpu_capacity / GiB:.2f} GiB): "
                      f"{line}. To fit, {fix}; `moetrain plan --config RECIPE` shows the plan")


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _inactive_file(stat: Path, key: str) -> int:
    """Page cache the kernel can drop (a cgroup counts it as used)."""
    try:
        for line in stat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def available_host_memory() -> Optional[int]:
    """Bytes of host memory a new allocation can have now: the kernel's ``MemAvailable``, and within a container
    its memory limit minus what the container uses (without reclaimable page cache); None where unknown."""
    found = []
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", MEMINFO.read_text(), re.MULTILINE)
        if match:
            found.append(int(match.group(1)) * 1024)
    except OSError:
        pass
    for limit, usage, stat, key in ((CGROUP / "memory.max", CGROUP / "memory.current", CGROUP / "memory.stat",
                                     "inactive_file"),
                                    (CGROUP / "memory/memory.limit_in_bytes", CGROUP / "memory/memory.usage_in_bytes",
                                     CGROUP / "memory/memory.stat", "total_inactive_file")):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 2**60:  # cgroup v1 writes a huge number for no limit
            found.append(max(0, cap - used + _inactive_file(stat, key)))
    return min(found) if found else None


# ---------------------------------------------------------------------------------------------- the trainer
def check_trainer(trainer: Mapping[str, Any]) -> None:
    """Build a throwaway Lightning ``Trainer`` from the ``trainer`` section, so that a value Lightning refuses
    (``max_steps: -5``, an unknown accelerator, a precision without its package) fails now, not after the model
    build. Entries given as class specs (callbacks, a logger or plugins by class path) are left out: jsonargparse
    builds them later.

    Raises:
        what Lightning's ``Trainer`` raises (MisconfigurationException, ValueError, TypeError, ImportError); the
        CLI turns it into a message naming ``trainer.<key>``.
    """
    from lightning.pytorch import Trainer

    def spec(value: Any) -> bool:
        value = _plain(value)
        return isinstance(value, dict) or (isinstance(value, (list, tuple)) and any(spec(v) for v in value))

    kwargs = {key: _plain(value) for key, value in _plain(trainer).items() if key != "callbacks" and not spec(value)}
    Trainer(**kwargs)


# ---------------------------------------------------------------------------------------------- at run time
def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    text = re.sub(r"^\[enforce fail at [^\]]*\] (err == 0\. )?", "", text)  # c10's source location: not for users
    return text if len(text) <= 240 else text[:237] + "..."


def resource_error_message(err: BaseException) -> Optional[str]:
    """One paragraph for a run that ran out of GPU memory, host or pinned memory, or disk, naming the settings
    that change it; None for any other error (which is not this function's to explain)."""
    text = str(err)
    lower = text.lower()
    import torch

    if isinstance(err, torch.OutOfMemoryError) or "cuda out of memory" in lower:
        return (f"the GPU ran out of memory ({_first_line(err)}). Lower data.micro_batch_size or data.seq_len, set "
                "model.activation_checkpointing=true, or offload the experts' optimizer state "
                "(model.offload.placement.tier=cpu; under a tier, a smaller model.offload.placement.gpu_budget_gb or "
                "hot_cache_gb, or resident_weights=no, leaves more room); `moetrain plan --config RECIPE` shows where "
                "the GPU memory goes")
    # the CUDA runtime's own "out of memory" (not the caching allocator's) comes from page-locking host memory
    if any(key in lower for key in ("cuda error: out of memory", "cudahostalloc", "cachinghostallocator",
                                    "pinned memory")):
        return (f"pinning host memory failed ({_first_line(err)}). Lower model.offload.placement.cpu_budget_gb so "
                "that the rest of the expert state goes to model.offload.nvme.path, store it compressed "
                "(model.offload.state.master=bf16_sr, model.offload.state.moments=int8), or use "
                "model.offload.placement.tier=nvme")
    if isinstance(err, MemoryError) or "can't allocate memory" in lower or "cannot allocate memory" in lower:
        from moetrain.training.host_guard import HostMemoryLow

        what = text if isinstance(err, HostMemoryLow) else _first_line(err)  # the guard's figures, whole
        return (f"host memory ran out ({what}). Lower model.offload.placement.cpu_budget_gb (the rest of "
                "the expert state goes to model.offload.nvme.path) or store it compressed "
                "(model.offload.state.master=bf16_sr, model.offload.state.moments=int8); lower "
                "data.micro_batch_size or data.num_workers; without a GPU, train a smaller model. `moetrain plan "
                "--config RECIPE` shows what goes to host memory")
    if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "no space left on device" in lower:
        where = f" writing {err.filename}" if isinstance(err, OSError) and err.filename else ""
        return (f"the disk is full{where} ({_first_line(err)}). Free space there, or move what is written: swap files "
                "to model.offload.nvme.path, checkpoints and metrics to trainer.default_root_dir "
                "(checkpoint.keep_last=N keeps only the newest N checkpoints)")
    return None
