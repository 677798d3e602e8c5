"""Loading DeepSpeed's JIT-built ops (``cpu_adam``, ``async_io``) with a build cache per Python environment.

torch caches JIT extensions in ``~/.cache/torch_extensions/py<ver>_<cuda>/<op>``; two virtual
environments with the same Python share that folder but compile with their own include paths, so
each one's load rebuilds the op the other just built (minutes on a small machine). Unless
``TORCH_EXTENSIONS_DIR`` is set, the ops are cached in a subfolder of that default keyed by the
environment (``sys.prefix``), so every environment builds once and keeps its build.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path


def sanitize_cuda_arch_list() -> None:
    """Drop architecture-specific suffixes (``9.0a`` -> ``9.0``) from ``TORCH_CUDA_ARCH_LIST``.

    DeepSpeed's op builders parse each entry as ``major.minor`` integers and fail on ``9.0a``
    ("invalid literal for int() with base 10: '0a'"), which some CUDA images and earlier JIT builds
    leave in the environment on Hopper machines. The plain ``9.0`` build runs on the same cards.
    """
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if value:
        os.environ["TORCH_CUDA_ARCH_LIST"] = re.sub(r"(\d+\.\d+)[a-z]+", r"\1", value)


def use_environment_build_cache() -> None:
    """Point ``TORCH_EXTENSIONS_DIR`` at this environment's cache folder unless the user chose one."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return
    tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch_extensions"
    os.environ["TORCH_EXTENSIONS_DIR"] = str(base / f"env-{tag}")


def load_cpu_adam():
    """DeepSpeed's ``cpu_adam`` op (built on first use)."""
    use_environment_build_cache()
    sanitize_cuda_arch_list()
    from deepspeed.ops.op_builder import CPUAdamBuilder
    return CPUAdamBuilder().load(verbose=False)


def load_async_io():
    """DeepSpeed's ``async_io`` op (needs libaio; built on first use)."""
    use_environment_build_cache()
    sanitize_cuda_arch_list()
    from deepspeed.ops.op_builder import AsyncIOBuilder
    return AsyncIOBuilder().load(verbose=False)


def build_all() -> int:
    """Build (or find in the cache) every op the engine may load, so that the first training step does not
    wait minutes for a compiler: ``python -m moetrain.offload.ops``. ``async_io`` is skipped, with a note,
    when libaio is missing (the NVMe tier then uses its threaded fallback)."""
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


if __name__ == "__main__":
    raise SystemExit(build_all())
