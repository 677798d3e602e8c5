"""Every optimizer completes :class:`~moetrain.optim.TrainOptimizer`, and nothing asks an optimizer what it has.

The training module, the checkpoint writers and the callbacks call the protocol's methods on any optimizer;
features that only the offload engine has are no-ops elsewhere. So no class may leave a method abstract, every
class in the package that steps parameters must be one of the protocol's, and the training code must not look
for optional features with ``getattr``/``hasattr``.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch

from moetrain.config import ModelConfig
from moetrain.models.decoder import MoEForCausalLM
from moetrain.offload import build_optimizer
from moetrain.offload.config import OffloadConfig
from moetrain.offload.optim import ExpertOffloadOptimizer
from moetrain.optim import CheckpointState, DenseAdamW, OptimizerConfig, TrainOptimizer
from moetrain.parallel.optimizer import ParallelOptimizer

PACKAGE = Path(__file__).resolve().parents[1] / "moetrain"
OPTIMIZERS = (DenseAdamW, ExpertOffloadOptimizer, ParallelOptimizer)


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _subclasses(sub)
    return found


def _tiny_model() -> MoEForCausalLM:
    return MoEForCausalLM(ModelConfig.from_preset(
        "tiny-deepseek-moe", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, num_experts=4, moe_intermediate_size=16))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_every_optimizer_implements_the_whole_protocol(cls):
    assert issubclass(cls, TrainOptimizer)
    assert not inspect.isabstract(cls), f"{cls.__name__} leaves {sorted(cls.__abstractmethods__)} abstract"
    for name, member in inspect.getmembers(TrainOptimizer, inspect.isfunction):
        if not name.startswith("_"):
            assert callable(getattr(cls, name)), name
            # same parameters as the protocol (an implementation may add keyword options, none may drop one)
            wanted = list(inspect.signature(member).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters)[:len(wanted)] == wanted, name


def test_the_protocol_itself_cannot_be_instantiated():
    with pytest.raises(TypeError):
        TrainOptimizer()  # type: ignore[abstract]


def test_every_optimizer_class_in_the_package_is_a_train_optimizer():
    """A class that steps parameters (``step`` and ``clip_grad_norm_``) must join the protocol."""
    steppers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
                if {"step", "clip_grad_norm_"} <= methods:
                    steppers.append(node.name)
    assert sorted(steppers) == sorted(c.__name__ for c in (TrainOptimizer, *OPTIMIZERS))
    assert set(OPTIMIZERS) <= _subclasses(TrainOptimizer)


def test_dense_adamw_answers_every_optional_feature_with_nothing():
    model = _tiny_model()
    opt = DenseAdamW(model, OptimizerConfig())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.begin_micro_batch(0, 1, 1e-3)
    assert not opt.steps_during_backward()
    opt.routed(1, None, torch.zeros(3, 32))
    opt.add_routed_counts(1, torch.ones(4, dtype=torch.int64))
    assert opt.telemetry() == {} and opt.routing_frequency() == {}
    opt.load_routing_frequency({1: [1.0] * 4})
    opt.finalize()
    saved = opt.checkpoint_state()
    assert isinstance(saved, CheckpointState) and saved.dense is opt.opt
    assert saved.expert_steps == {} and saved.lr_history == []
    assert list(saved.named_master_tensors()) == [] and list(saved.named_optimizer_tensors()) == []
    opt.close()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_the_engine_says_when_backward_steps_experts(max_grad_norm):
    """The rule the checkpoint callback relies on (it waits for an asynchronous save's reads before such a
    backward): only the last micro-batch, only without clipping."""
    model = _tiny_model()
    opt = build_optimizer(model, OptimizerConfig(max_grad_norm=max_grad_norm), OffloadConfig(tier="cpu"))
    try:
        assert isinstance(opt, ExpertOffloadOptimizer)
        opt.begin_micro_batch(0, 2, 1e-3)
        assert not opt.steps_during_backward()
        opt.begin_micro_batch(1, 2, 1e-3)
        assert opt.steps_during_backward() is (max_grad_norm == 0)
        saved = opt.checkpoint_state()
        assert saved.dense is opt.dense and set(saved.expert_steps) == model.expert_parameter_names()
        assert {n for n, _ in saved.named_master_tensors()} == model.expert_parameter_names()
        assert set(opt.routing_frequency()) == set(opt.store.layers)
    finally:
        opt.close()


# the optimizer's attributes and methods, and the module state that once stood in for them
_OPTIMIZER_WORDS = re.compile(r"optim|\bopt\b|\binner\b|\bstore\b|\bcfg\b|telemetry|begin_micro_batch|finalize|"
                              r"\bclose\b|named_\w+_tensors|expert_steps|load_expert_tensors|lr_history|_micro\b")
_CHECKED = sorted([*PACKAGE.glob("training/*.py"), *PACKAGE.glob("bench/*.py"),
                   *(PACKAGE / "parallel" / name for name in ("optimizer.py", "checkpoint.py", "runtime.py"))])


def _feature_lookups(source: str) -> list[tuple[int, str]]:
    """``(line, call)`` of every ``getattr``/``hasattr`` call in ``source`` that names an optimizer or a feature."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            text = ast.unparse(node)
            if _OPTIMIZER_WORDS.search(text):
                found.append((node.lineno, text))
    return found


def test_the_lookup_finder_finds_the_old_habits():
    old = ('begin = getattr(self.train_optimizer, "begin_micro_batch", None)\n'
           'last = getattr(pl_module, "_micro", 0) == 1\n'
           'ok = hasattr(optimizer, "telemetry")\n'
           'masters = getattr(getattr(opt, "inner", opt), "named_master_tensors", None)\n'
           'fine = getattr(trainer, "datamodule", None)\n')
    assert sorted(line for line, _ in _feature_lookups(old)) == [1, 2, 3, 4, 4]  # the nested lookup twice


def test_no_getattr_or_hasattr_on_optimizers():
    assert len(_CHECKED) > 15
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {text}" for path in _CHECKED
             for line, text in _feature_lookups(path.read_text(encoding="utf-8"))]
    assert not found, "call the TrainOptimizer method (a no-op where the feature does not apply):\n" + "\n".join(found)
