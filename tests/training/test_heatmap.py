"""Expert-load heatmaps: labeled axes and colour bar, a readable size, and one every heatmap_every_n_steps."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from moetrain.cli import main
from moetrain.training.telemetry import figure_png, load_heatmap

REPO = Path(__file__).resolve().parents[2]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR: width, height


def tiny_load() -> torch.Tensor:
    return torch.arange(48, dtype=torch.float32).reshape(3, 16) + 1  # (M=3 layers, E=16 experts)


def test_heatmap_labels_its_axes_and_colour_bar():
    load = tiny_load()
    fig = load_heatmap(load, [1, 2, 3])
    grid, bar = fig.axes
    assert "expert" in grid.get_xlabel() and "layer" in grid.get_ylabel()
    assert [t.get_text() for t in grid.get_yticklabels()] == ["1", "2", "3"]
    assert "share of the layer's routed tokens" in bar.get_ylabel() and "1/16" in bar.get_ylabel()
    shown = grid.images[0].get_array()
    assert torch.allclose(torch.as_tensor(shown.sum(axis=1)), torch.ones(3, dtype=torch.float64))

    fig = load_heatmap(load, [1, 2, 3], share=False)
    grid, bar = fig.axes
    assert bar.get_ylabel() == "tokens routed to the expert"
    assert torch.equal(torch.as_tensor(grid.images[0].get_array()), load.double())


def test_heatmap_of_a_small_model_is_readable():
    width, height = png_size(figure_png(load_heatmap(tiny_load(), [1, 2, 3], title="expert load, steps 1-50")))
    assert width >= 800 and height >= 450
    # many experts: the figure grows, so that each expert's column keeps its width
    wide, _ = png_size(figure_png(load_heatmap(torch.ones(4, 128), [1, 2, 3, 4])))
    assert wide >= 128 * 12


def test_a_heatmap_every_n_steps_when_logging_is_sparser(tmp_path):
    """log_every_n_steps 2 and heatmap_every_n_steps 3: heatmaps at steps 4 and 6 (past 3 and at 6), not only at
    the common multiple 6; together they cover every step."""
    run_dir = tmp_path / "run"
    code = main(["fit", "--config", str(REPO / "recipes" / "tiny.yaml"), f"--trainer.default_root_dir={run_dir}",
                 f"--data.path={REPO / 'data' / 'tiny' / 'val.jsonl'}",
                 f"--data.tokenizer={REPO / 'data' / 'tiny' / 'tokenizer'}", "--data.val_path=null",
                 "--data.seq_len=64", "--trainer.max_steps=6", "--model.log_every_n_steps=2",
                 "--metrics.heatmap_every_n_steps=3", "--metrics.logger=csv", "--checkpoint.save_final=false"])
    assert code == 0
    records = [json.loads(line) for line in (run_dir / "expert_load.jsonl").read_text().splitlines()]
    assert [(r["from_step"], r["step"]) for r in records] == [(1, 4), (5, 6)]
    for record in records:
        image = run_dir / "csv" / "images" / f"routing_expert_load-{record['step']}.png"
        width, height = png_size(image.read_bytes())
        assert width >= 800 and height >= 450

