"""Both notebooks run top to bottom (a few training steps), and are stored without outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
nbformat = pytest.importorskip("nbformat")


def test_the_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "offload"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_are_stripped(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("MOETRAIN_NOTEBOOK_STEPS", "6")
    monkeypatch.setenv("MOETRAIN_NOTEBOOK_RUNS", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    nb = nbformat.read(path, as_version=4)
    # the kernel inherits this process's environment (the variables above) and starts in notebooks/
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
              if "image/png" in o.get("data", {})]
    if path.stem == "quickstart":
        assert "loss " in text and "routing entropy per layer" in text and "On Monday, Anna went to" in text
        assert len(images) >= 2  # the loss curve and the expert-load heatmap
    else:
        assert "offload tier: cpu" in text and "offload/step_s" in text
        assert len(images) >= 2  # bytes per tier and the step-time breakdown
