"""The CUDA allocator settings moetrain runs with (moetrain.cuda_alloc), and that the command line applies them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moetrain import cuda_alloc


@pytest.fixture
def clean_env(monkeypatch):
    for name in cuda_alloc.SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_turn_expandable_segments_on(clean_env):
    cuda_alloc.apply_defaults()
    assert os.environ["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"


@pytest.mark.parametrize("name", cuda_alloc.SETTINGS_ENV)
def test_a_users_settings_are_kept(clean_env, name):
    clean_env.setenv(name, "max_split_size_mb:512, expandable_segments:False")
    cuda_alloc.apply_defaults()
    assert os.environ[name] == "max_split_size_mb:512, expandable_segments:False"
    assert all(n == name or n not in os.environ for n in cuda_alloc.SETTINGS_ENV)


def test_the_command_line_sets_them_before_cuda_is_touched():
    env = {k: v for k, v in os.environ.items() if k not in cuda_alloc.SETTINGS_ENV}
    code = ("import os, sys; from moetrain import cli; "
            "sys.argv = ['moetrain', '--help']; cli.main(); print(os.environ.get('PYTORCH_ALLOC_CONF'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "expandable_segments:True"
