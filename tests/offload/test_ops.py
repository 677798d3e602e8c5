"""DeepSpeed op loading: the CUDA arch list is made parseable for DeepSpeed's builders; a load that compiles says
so; ``moetrain build-ops`` builds ahead of time."""

import os
import re
import subprocess
import sys

import pytest

from moetrain.offload.ops import sanitize_cuda_arch_list


def test_arch_suffixes_are_dropped(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a;9.0+PTX 10.0a")
    sanitize_cuda_arch_list()
    import os

    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0;9.0+PTX 10.0"
    # DeepSpeed parses every entry as integers after dropping +PTX
    for cc in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";"):
        [int(part.split("+")[0]) for part in cc.split(".")]


def test_unset_arch_list_stays_unset(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    sanitize_cuda_arch_list()
    import os

    assert "TORCH_CUDA_ARCH_LIST" not in os.environ


def test_a_cached_op_loads_silently_and_an_uncached_one_is_pending(monkeypatch, tmp_path, capfd):
    from moetrain.offload.ops import build_pending, load_cpu_adam

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)  # this environment's own cache
    load_cpu_adam()  # built here already (CI builds the ops after the install), or built once now
    capfd.readouterr()
    load_cpu_adam()
    assert not build_pending("cpu_adam")
    assert "compiling" not in capfd.readouterr().err
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty cache: the next load would compile
    assert build_pending("cpu_adam") and build_pending("async_io")


def test_build_ops_subcommand_builds_or_finds_every_op(capsys):
    from moetrain.cli import main

    assert main(["build-ops"]) == 0
    out = capsys.readouterr().out
    assert "cpu_adam: built" in out and "async_io:" in out


@pytest.mark.slow
def test_first_build_announces_itself_once_with_its_duration(tmp_path):
    """A load that compiles says so before the compiler starts and how long it took after; the next load is silent."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    code = "from moetrain.offload.ops import load_cpu_adam; load_cpu_adam(); load_cpu_adam()"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr.count("moetrain: compiling DeepSpeed's cpu_adam op once for this environment") == 1
    assert "`moetrain build-ops` does it ahead of time" in first.stderr
    assert re.search(r"moetrain: compiled DeepSpeed's cpu_adam op in \d+ s", first.stderr)
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "moetrain: compil" not in again.stderr
