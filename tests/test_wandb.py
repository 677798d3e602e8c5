"""Weights & Biases offline: the tiny recipe's run directory holds the logged metrics (equal to metrics.jsonl), the
resolved recipe as the run config, and expert-load heatmap images; a resumed run continues the same run id.
CSV and TensorBoard are checked the same way against metrics.jsonl."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from moetrain.cli import main

REPO = Path(__file__).resolve().parents[1]
pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")


def wandb_records(path: Path):
    """Protobuf records of a ``run-<id>.wandb`` file (LevelDB log format: 32 KiB blocks, 7-byte record headers)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
    return


def read_wandb_run(run_dir: Path) -> dict:
    """run id, tags, config and history rows ({key: value}) of an offline run directory."""
    (log,) = run_dir.glob("run-*.wandb")
    out = {"history": [], "config": {}}
    for raw in wandb_records(log):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["tags"] = record.run.run_id, list(record.run.tags)
            out["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.history.item})
    return out


def fit(run_dir: Path, *args: str) -> None:
    code = main(["fit", "--config", str(REPO / "recipes" / "tiny.yaml"), f"--trainer.default_root_dir={run_dir}",
                 f"--data.path={REPO / 'data' / 'tiny' / 'train.jsonl'}",
                 f"--data.val_path={REPO / 'data' / 'tiny' / 'val.jsonl'}",
                 f"--data.tokenizer={REPO / 'data' / 'tiny' / 'tokenizer'}", "--data.seq_len=64", *args])
    assert code == 0


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_offline_wandb_run_holds_metrics_and_heatmaps_and_resume_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-default"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run"
    fit(run_dir, "--trainer.max_steps=4", "--checkpoint.every_n_steps=2", "--metrics.logger=wandb",
        "--metrics.tags=[tiny,test]", "--metrics.heatmap_every_n_steps=2", "--metrics.project=moetrain-tests")
    (first,) = (run_dir / "wandb").glob("offline-run-*")
    run = read_wandb_run(first)
    assert run["tags"] == ["tiny", "test"]
    assert run["config"]["model"]["preset"] == "tiny-deepseek-moe" and run["config"]["trainer"]["max_steps"] == 4
    jsonl = metrics_lines(run_dir)
    rows = {row["_step"]: row for row in run["history"]}
    assert sorted(rows) == [1, 2, 3, 4]
    for line in jsonl:  # every number of metrics.jsonl reached W&B unchanged
        row = rows[line["step"]]
        for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "aux_loss/layer_1", "routing/entropy_mean"):
            assert row[key] == pytest.approx(line[key], rel=1e-6), key
    heatmaps = [rows[s]["routing/expert_load/path"] for s in (2, 4)]
    for rel in heatmaps:
        assert (first / "files" / rel).read_bytes()[:4] == b"\x89PNG"
    load = [json.loads(line) for line in (run_dir / "expert_load.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in load] == [2, 4] and rec_sum(load[0]) == 2 * 8 * 64 * 2 * len(load[0]["layers"])

    # resume from the step-4 checkpoint for two more steps: same W&B run id, history continues at step 5
    fit(run_dir, "--trainer.max_steps=6", "--checkpoint.every_n_steps=2", "--metrics.logger=wandb",
        "--metrics.heatmap_every_n_steps=2", "--ckpt_path=last")
    second = [d for d in (run_dir / "wandb").glob("offline-run-*") if d != first]
    assert len(second) == 1
    resumed = read_wandb_run(second[0])
    assert resumed["id"] == run["id"]
    assert sorted(row["_step"] for row in resumed["history"]) == [5, 6]
    assert [line["step"] for line in metrics_lines(run_dir)] == [1, 2, 3, 4, 5, 6]


def rec_sum(record: dict) -> int:
    """Tokens x top-k routed in an expert_load.jsonl record (all layers)."""
    return sum(sum(row) for row in record["load"])


@pytest.mark.parametrize("logger", ["csv", "tensorboard"])
def test_csv_and_tensorboard_loggers_receive_the_same_metrics(tmp_path, logger):
    run_dir = tmp_path / "run"
    fit(run_dir, "--trainer.max_steps=2", "--metrics.logger=" + logger, "--metrics.heatmap_every_n_steps=2",
        "--checkpoint.save_final=false")
    jsonl = metrics_lines(run_dir)
    if logger == "csv":
        import csv

        with open(run_dir / "csv" / "metrics.csv") as f:
            rows = {int(r["step"]): r for r in csv.DictReader(f)}
        for line in jsonl:
            assert float(rows[line["step"]]["loss"]) == pytest.approx(line["loss"], rel=1e-6)
        assert (run_dir / "csv" / "images" / "routing_expert_load-2.png").read_bytes()[:4] == b"\x89PNG"
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
        losses = {e.step: e.value for e in events.Scalars("loss")}
        assert losses == pytest.approx({line["step"]: line["loss"] for line in jsonl}, rel=1e-6)
        assert [e.step for e in events.Images("routing/expert_load")] == [2]
