"""Changing when the engine steps a layer is an edit of ``moetrain/offload/schedule.py`` only.

Statically: no other module of the package reads ``max_grad_norm`` in a comparison or tells the last micro-batch
from the others (the two facts the rule rests on); the engine asks ``schedule.steps_under_backward``. Dynamically:
replacing that one function changes what the engine does, and the result is still torch AdamW's.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from offload_harness import OPTIM, batches, clone, max_diff, tiny_model, train

from moetrain.offload import build_optimizer, schedule
from moetrain.offload.config import OffloadConfig
from moetrain.optim import DenseAdamW

PACKAGE = Path(__file__).resolve().parents[2] / "moetrain"
OWNER = PACKAGE / "offload" / "schedule.py"


def _decides(path: Path) -> list[str]:
    """Comparisons in ``path`` that read ``max_grad_norm`` or test for the last micro-batch (``... - 1``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            text = ast.unparse(node)
            last = any(isinstance(side, ast.BinOp) and isinstance(side.op, ast.Sub) and
                       isinstance(side.right, ast.Constant) and side.right.value == 1
                       for side in [node.left, *node.comparators])
            if "max_grad_norm" in text or (last and "micro" in text):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {text}")
    return found


def test_only_the_schedule_module_decides():
    assert _decides(OWNER), "the finder must find the rule where it lives"
    others = [hit for path in sorted(PACKAGE.rglob("*.py")) if path != OWNER for hit in _decides(path)]
    assert not others, "the schedule's rule outside offload/schedule.py:\n" + "\n".join(others)
    callers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if p != OWNER and "steps_under_backward(" in p.read_text(encoding="utf-8"))
    assert "offload/engine.py" in callers


def test_the_engine_follows_the_schedule_module(monkeypatch):
    """Never stepping under backward (one function replaced) still trains like torch AdamW."""
    no_clip = dataclasses.replace(OPTIM, max_grad_norm=0.0)
    base, data = tiny_model(), batches(steps=4)
    ref = clone(base)
    train(ref, DenseAdamW(ref, no_clip), data, cfg=no_clip, total=4)
    runs = {}
    for name, rule in (("as shipped", schedule.steps_under_backward), ("never", lambda *a, **k: False)):
        monkeypatch.setattr(schedule, "steps_under_backward", rule)
        model = clone(base)
        opt = build_optimizer(model, no_clip, OffloadConfig(tier="cpu", gpu_slots=3))
        seen: list[dict[str, float]] = []
        record = (lambda o, s: lambda _: s.append(o.telemetry()))(opt, seen)
        train(model, opt, data, cfg=no_clip, total=4, on_step=record)
        opt.finalize()
        opt.close()
        runs[name] = [t["offload/layers_stepped_in_backward"] for t in seen]
        assert max_diff(model, ref) <= 1e-6
    assert all(n == 2 for n in runs["as shipped"]) and all(n == 0 for n in runs["never"])
