"""Loading DeepSpeed's JIT-built ops (``cpu_adam``, ``async_io``) with a build cache per Python environment
(:mod:`moetrain.offload.build_cache`).

The first build in an environment takes minutes, and DeepSpeed says nothing useful while it runs: a load
that has to compile says so on stderr first (which op, about how long, how to do it ahead of time) and
how long it took after. ``moetrain build-ops`` (or ``python -m moetrain.offload.ops``) builds every op
ahead of time, for example right after the install.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moetrain.offload.adam_cuda_order import build as build_cpu_share_adamw
from moetrain.offload.build_cache import use_environment_build_cache

BUILD_MINUTES = {"cpu_adam": 2, "async_io": 4}
"""About how long a first build takes on a small machine (2 cores): what the announcement promises."""
AHEAD_OF_TIME = "moetrain build-ops"


def sanitize_cuda_arch_list() -> None:
    """Drop architecture-specific suffixes (``9.0a`` -> ``9.0``) from ``TORCH_CUDA_ARCH_LIST``.

    DeepSpeed's op builders parse each entry as ``major.minor`` integers and fail on ``9.0a``
    ("invalid literal for int() with base 10: '0a'"), which some CUDA images and earlier JIT builds
    leave in the environment on Hopper machines. The plain ``9.0`` build runs on the same cards.
    """
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if value:
        os.environ["TORCH_CUDA_ARCH_LIST"] = re.sub(r"(\d+\.\d+)[a-z]+", r"\1", value)


def build_pending(name: str) -> bool:
    """Whether loading op ``name`` will compile it: no build of it in this environment's cache, and DeepSpeed was
    not installed with it prebuilt (``DS_BUILD_OPS=1``)."""
    use_environment_build_cache()
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(name, False):
        return False
    return not (Path(os.environ["TORCH_EXTENSIONS_DIR"]) / name / f"{name}.so").is_file()


def _load(builder: Any, announce: Callable[[str], None]) -> Any:
    """``builder.load()``, saying on stderr that a compile is starting and, after it, how long it took."""
    pending = build_pending(builder.name)
    if pending:
        minutes = BUILD_MINUTES.get(builder.name, 3)
        announce(f"compiling DeepSpeed's {builder.name} op once for this environment (about {minutes} minutes on a "
                 f"small machine; `{AHEAD_OF_TIME}` does it ahead of time) ...")
    start = time.monotonic()
    op = builder.load(verbose=False)
    if pending:
        announce(f"compiled DeepSpeed's {builder.name} op in {time.monotonic() - start:.0f} s; later runs in this "
                 f"environment load it from {os.environ['TORCH_EXTENSIONS_DIR']}")
    return op


def _stderr(message: str) -> None:
    print(f"moetrain: {message}", file=sys.stderr, flush=True)


def load_cpu_adam(announce: Callable[[str], None] = _stderr):
    """DeepSpeed's ``cpu_adam`` op (built on first use, announced through ``announce``)."""
    use_environment_build_cache()
    sanitize_cuda_arch_list()
    from deepspeed.ops.op_builder import CPUAdamBuilder
    return _load(CPUAdamBuilder(), announce)


def load_async_io(announce: Callable[[str], None] = _stderr):
    """DeepSpeed's ``async_io`` op (needs libaio; built on first use, announced through ``announce``)."""
    use_environment_build_cache()
    sanitize_cuda_arch_list()
    from deepspeed.ops.op_builder import AsyncIOBuilder
    return _load(AsyncIOBuilder(), announce)


def build_all() -> int:
    """Build (or find in the cache) every op the engine may load, so that the first training step does not
    wait minutes for a compiler: ``moetrain build-ops`` or ``python -m moetrain.offload.ops``. ``async_io`` is
    skipped, with a note, when libaio is missing (the NVMe tier then uses its threaded fallback). The CPU share's
    own AdamW (:mod:`moetrain.offload.adam_cuda_order`, a second with the C compiler) is built too."""
    build_cpu_share_adamw()
    print("adamw_cuda_order: built")
    load_cpu_adam()
    print("cpu_adam: built")
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        if not AsyncIOBuilder().is_compatible(verbose=False):
            print("async_io: libaio is missing; the NVMe tier will use its threaded fallback")
            return 0
        load_async_io()
        print("async_io: built")
    except Exception as err:  # a failed build leaves the fallback, which the engine announces itself
        print(f"async_io: not built ({err}); the NVMe tier will use its threaded fallback")
    return 0


def main(argv: list[str]) -> int:
    """``moetrain build-ops``: compile DeepSpeed's ops for this environment now (no arguments)."""
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: {AHEAD_OF_TIME}\n\ncompile DeepSpeed's cpu_adam and async_io ops for this environment "
              "(once; training runs then load them in seconds)")
        return 0
    if argv:
        print(f"usage: {AHEAD_OF_TIME} (no arguments)", file=sys.stderr)
        return 2
    return build_all()


if __name__ == "__main__":
    raise SystemExit(build_all())
