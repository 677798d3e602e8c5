"""Where compiled extensions are cached: one folder per Python environment.

torch caches JIT extensions in ``~/.cache/torch_extensions/py<ver>_<cuda>/<op>``; two virtual environments with the
same Python share that folder but compile with their own include paths, so each one's load rebuilds the op the other
just built (minutes on a small machine). Unless ``TORCH_EXTENSIONS_DIR`` is set, DeepSpeed's ops
(:mod:`moetrain.offload.ops`) and the CPU share's AdamW (:mod:`moetrain.offload.adam_cuda_order`) are cached in a
subfolder of that default keyed by the environment (``sys.prefix``), so every environment builds once and keeps its
build.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path


def use_environment_build_cache() -> None:
    """Point ``TORCH_EXTENSIONS_DIR`` at this environment's cache folder unless the user chose one."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return
    tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch_extensions"
    os.environ["TORCH_EXTENSIONS_DIR"] = str(base / f"env-{tag}")
