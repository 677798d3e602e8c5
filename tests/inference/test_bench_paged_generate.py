"""``moetrain bench paged_generate`` on the CPU with a tiny preset: the paged tokens equal the resident ones, and
the figures it prints are the ones the GPU run is judged by (hit rate beside the ideal static cache's, bytes paged
per token, the resident time per token, the floor and paged / floor, side by side in a table and in the RESULT
line), for the model's dtype and int8 in the same run, each with its decode speed and validation loss; the
resident time is that of a pass after an untimed one of the same shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from moetrain.bench import main as bench_main

TINY = Path(__file__).resolve().parents[2] / "data" / "tiny"


def _output(capsys) -> tuple[list[str], dict]:
    """The lines printed before the RESULT line, and the RESULT."""
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("RESULT "))
    return lines[:at], json.loads(lines[at][len("RESULT "):])


def test_paged_generate_smoke(tmp_path, capsys):
    assert bench_main(["paged_generate", "--preset", "tiny-qwen3-moe", "--make_dir", str(tmp_path / "model"),
                       "--prompt_tokens", "12", "--new_tokens", "10", "--val_batches", "2", "--val_seq_len", "16",
                       "--out", str(tmp_path / "out")]) == 0
    table, result = _output(capsys)
    assert result == json.loads((tmp_path / "out" / "paged_generate.json").read_text())
    assert result["cache_slots"] == int(0.7 * result["total_experts"]) < result["total_experts"]
    resident = result["resident"]
    assert result["link_gb_s"] > 0 and resident["decode_tokens_per_s"] > 0
    assert resident["first_pass_decode_s_per_token"] > 0 and resident["first_pass_prefill_s"] > 0
    assert resident["grouped_decode_s_per_token"] is None  # CUDA only
    assert result["val_data"] == "random token ids (2x2x16)"
    assert result["prefetch_when_busy"] == "first"  # the default
    full, int8 = result["expert_dtypes"]["float32"], result["expert_dtypes"]["int8"]
    assert result["paged"] == full["paged"] and result["expert_dtype"] == "float32"
    for policy in ("lru", "lfu"):
        paged = result["paged"][policy]
        assert paged["tokens_equal_resident"] is True
        assert 0 < paged["ideal_static_hit_rate"] <= 1 and 0 <= paged["hit_rate"] <= 1
        assert paged["bytes_paged_per_token"] >= paged["miss_bytes_per_token"] > 0
        # prefetched bytes no demand used: part of the bytes the decode paged beyond its misses
        wasted = paged["wasted_prefetch_bytes_per_token"]
        assert 0 <= wasted <= paged["bytes_paged_per_token"] - paged["miss_bytes_per_token"]
        assert paged["prefetch_skipped"] >= 0
        assert paged["resident_s_per_token"] == resident["decode_s_per_token"]
        assert paged["link_s_per_token"] == pytest.approx(paged["bytes_paged_per_token"] / (result["link_gb_s"] * 1e9))
        assert paged["retained_hit_rate"] <= paged["hit_rate"]
        floor = resident["decode_s_per_token"] + paged["miss_bytes_per_token"] / (result["link_gb_s"] * 1e9)
        assert paged["floor_s_per_token"] == floor
        assert paged["vs_floor"] == round(paged["decode_s_per_token"] / floor, 3)
        assert paged["targets_met"] == {"vs_floor": paged["vs_floor"] <= 1.3,
                                        "hit_vs_ideal": paged["hit_vs_ideal"] >= 0.95}
        assert int8["paged"][policy]["decode_tokens_per_s"] > 0
    # the table: a row per expert dtype and policy, the figures of the RESULT line beside each other
    assert table[0].startswith(f"link {result['link_gb_s']} GB/s; resident: {resident['decode_s_per_token']:.4f}")
    assert table[1].split() == ["experts", "policy", "slots", "tokens/s", "s/token", "hit", "ideal", "hit/ideal",
                                "GB/token", "wasted", "prefetch", "GB/token", "miss", "GB/token", "resident", "s/token",
                                "floor", "s/token", "paged/floor"]
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in table[2:]}
    assert set(rows) == {(d, p) for d in ("float32", "int8") for p in ("lru", "lfu")}
    for (dtype, policy), cells in rows.items():
        entry = result["expert_dtypes"][dtype]["paged"][policy]
        assert cells == [str(result["expert_dtypes"][dtype]["cache_slots"]), f"{entry['decode_tokens_per_s']:.1f}",
                         f"{entry['decode_s_per_token']:.4f}", f"{entry['hit_rate']:.3f}",
                         f"{entry['ideal_static_hit_rate']:.3f}", f"{entry['hit_vs_ideal']:.2f}",
                         f"{entry['bytes_paged_per_token'] / 1e9:.3f}",
                         f"{entry['wasted_prefetch_bytes_per_token'] / 1e9:.3f}",
                         f"{entry['miss_bytes_per_token'] / 1e9:.3f}",
                         f"{entry['resident_s_per_token']:.4f}", f"{entry['floor_s_per_token']:.4f}",
                         f"{entry['vs_floor']:.2f}"]
    # the same cache bytes hold about four times the int8 experts of fp32 (scales aside), capped at every expert
    assert int8["cache_slots"] == min(result["total_experts"],
                                      full["cache_slots"] * full["expert_bytes"] // int8["expert_bytes"])
    assert int8["expert_bytes"] < full["expert_bytes"] / 3
    # paged validation in the model's dtype is resident validation; int8 moves the loss, a little
    assert full["val_loss"] == pytest.approx(result["resident"]["val_loss"], abs=1e-6)
    assert int8["val_loss"] != full["val_loss"] and abs(int8["val_loss"] - full["val_loss"]) < 0.01 * full["val_loss"]
    compare = result["int8_vs_bf16"]
    assert compare["val_loss_delta"] == int8["val_loss"] - full["val_loss"]
    assert set(compare["decode_speedup"]) == {"lru", "lfu"} and all(v > 0 for v in compare["decode_speedup"].values())
    assert math.isfinite(full["val_loss"]) and full["val_loss"] > 0


def test_paged_generate_scores_a_data_file(tmp_path, capsys):
    # tiny-deepseek-moe: 4096 ids, room for the 683-token tiny tokenizer
    assert bench_main(["paged_generate", "--preset", "tiny-deepseek-moe", "--make_dir", str(tmp_path / "model"),
                       "--prompt_tokens", "8", "--new_tokens", "4", "--policy", "lru", "--expert_dtype", "auto",
                       "--skip_resident", "--val_data", str(TINY / "val.jsonl"), "--tokenizer",
                       str(TINY / "tokenizer"), "--val_batches", "1", "--val_seq_len", "32",
                       "--prefetch_when_busy", "never"]) == 0
    table, result = _output(capsys)
    assert result["prefetch_when_busy"] == "never"
    assert result["val_data"] == f"{TINY / 'val.jsonl'} (1x2x32 tokens)" and "int8_vs_bf16" not in result
    assert table[0].endswith("resident: not run") and table[2].split()[-3:] == ["-", "-", "-"]  # no floor
    assert result["paged"]["lru"]["targets_met"]["vs_floor"] is None
    assert list(result["expert_dtypes"]) == ["float32"] and result["expert_dtypes"]["float32"]["val_loss"] > 0
    assert bench_main(["paged_generate", "--model", str(tmp_path / "model"), "--val_data",
                       str(TINY / "val.jsonl")]) == 2
    assert "--val_data needs --tokenizer" in capsys.readouterr().err
