"""``moetrain bench paged_generate`` on the CPU with a tiny preset: the paged tokens equal the resident ones, and
the figures it prints are the ones the GPU run is judged by (hit rate beside the ideal static cache's, the floor)."""

from __future__ import annotations

import json

from moetrain.bench import main as bench_main


def test_paged_generate_smoke(tmp_path, capsys):
    assert bench_main(["paged_generate", "--preset", "tiny-qwen3-moe", "--make_dir", str(tmp_path / "model"),
                       "--prompt_tokens", "12", "--new_tokens", "10", "--out", str(tmp_path / "out")]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result == json.loads((tmp_path / "out" / "paged_generate.json").read_text())
    assert result["cache_slots"] == int(0.7 * result["total_experts"]) < result["total_experts"]
    assert result["link_gb_s"] > 0 and result["resident"]["decode_tokens_per_s"] > 0
    for policy in ("lru", "lfu"):
        paged = result["paged"][policy]
        assert paged["tokens_equal_resident"] is True
        assert 0 < paged["ideal_static_hit_rate"] <= 1 and 0 <= paged["hit_rate"] <= 1
        assert paged["bytes_paged_per_token"] >= paged["miss_bytes_per_token"] > 0
        floor = result["resident"]["decode_s_per_token"] + paged["miss_bytes_per_token"] / (result["link_gb_s"] * 1e9)
        assert paged["floor_s_per_token"] == floor
