"""``host/rss_anon_gib`` follows this process's private heap (what a step-to-step leak would grow)."""

from __future__ import annotations

import sys

import pytest
import torch

from moetrain.training.telemetry import host_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_private_heap_growth_shows_in_rss_anon():
    before = host_memory()
    assert set(before) == {"host/rss_anon_gib", "host/rss_shared_gib"}
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB of private, touched pages
    grown = host_memory()["host/rss_anon_gib"] - before["host/rss_anon_gib"]
    assert 0.05 < grown < 0.2, grown
    del block
