"""Imports point down the layers, and no module imports itself back through others.

Every ``import`` of every module under ``moetrain/`` is read from its source (module level and inside functions
alike: an import moved into a function to dodge a cycle is still a cycle), without importing anything.

The layers, lowest first (a module may import its own layer and the ones below)::

    base       moetrain.config, .atomic, .shards, .progress (long-loop bars), .optim (optimizer config, dense AdamW),
               .cuda_alloc (the CUDA allocator settings)
    models     moetrain.models     the model and its Hugging Face files; .routing_stats (routing measured per expert)
    offload    moetrain.offload    expert state in tiers, the expert optimizer, the planner
    inference  moetrain.inference  paged experts for generation and validation (an expert cache on the device)
    training   moetrain.training   the LightningModule, data, callbacks, checkpoints
    parallel   moetrain.parallel   several ranks (reads and writes the training layer's checkpoints)
    entry      moetrain (the package), .cli, .lightning_cli (fit and validate), .preflight, .generate, .prune,
               .select_experts, .bench
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moetrain"

LAYERS = {
    "base": ("moetrain.config", "moetrain.atomic", "moetrain.shards", "moetrain.progress", "moetrain.optim",
             "moetrain.cuda_alloc"),
    "models": ("moetrain.models", "moetrain.routing_stats"),
    "offload": ("moetrain.offload",),
    "inference": ("moetrain.inference",),
    "training": ("moetrain.training",),
    "parallel": ("moetrain.parallel",),
    "entry": ("moetrain", "moetrain.cli", "moetrain.lightning_cli", "moetrain.preflight", "moetrain.generate",
              "moetrain.prune", "moetrain.select_experts", "moetrain.bench"),
}
RANK = {prefix: rank for rank, prefixes in enumerate(LAYERS.values()) for prefix in prefixes}


def _modules() -> dict[str, Path]:
    """Dotted name -> source file of every module of the package (a package is its ``__init__.py``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _owner(name: str) -> str:
    """The module that ``name`` (a module, or a name inside one) lives in."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str) -> dict[str, int]:
    """The package's modules that ``module`` imports anywhere in its source -> the line of the first such import."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # ``from moetrain.training import signals`` imports the module moetrain.training.signals
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        for target in targets:
            if target == "moetrain" or target.startswith("moetrain."):
                owner = _owner(target)
                if owner != module:
                    found.setdefault(owner, node.lineno)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _layer(module: str) -> str | None:
    """The entry of :data:`LAYERS` that ``module`` belongs to (the longest that names it or a package above it;
    ``moetrain`` names the package's ``__init__`` only); None: in no layer yet."""
    return max((p for p in RANK if module == p or (p != "moetrain" and module.startswith(p + "."))),
               key=len, default=None)


def _cycles() -> list[list[str]]:
    """Every set of modules that import each other (strongly connected components of two or more), as one
    cycle through each, found by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return components


def test_the_walk_sees_every_kind_of_import():
    """The reader itself: module-level, function-level, ``from package import module`` and names in modules."""
    assert len(MODULES) > 50 and "moetrain.training.module" in MODULES
    module = GRAPH["moetrain.training.module"]
    assert "moetrain.optim" in module  # from moetrain.optim import OptimizerConfig, ...
    assert "moetrain.training.trainer_state" in module  # from moetrain.training import trainer_state
    assert "moetrain.offload" in module  # from moetrain.offload import build_optimizer (the package's own name)
    assert "moetrain.offload.staged_init" in GRAPH["moetrain.training.model_build"]  # inside a function
    assert "moetrain.models.hf" in GRAPH["moetrain"]  # inside from_pretrained


def test_no_import_cycles():
    cycles = _cycles()
    described = ["; ".join(f"{a} -> {b} (line {GRAPH[a][b]})" for a in cycle for b in GRAPH[a] if b in cycle)
                 for cycle in cycles]
    assert not cycles, "modules that import each other (move the shared part below both):\n" + "\n".join(described)


@pytest.mark.parametrize("lower, upper", [("moetrain.models", ("moetrain.offload", "moetrain.training",
                                                               "moetrain.parallel")),
                                          ("moetrain.offload", ("moetrain.training", "moetrain.parallel")),
                                          ("moetrain.optim", ("moetrain.models", "moetrain.offload",
                                                              "moetrain.training", "moetrain.parallel")),
                                          ("moetrain.progress", ("moetrain.models", "moetrain.training"))])
def test_a_layer_imports_nothing_above_it(lower, upper):
    wrong = [f"{module}:{line} imports {target}" for module, targets in GRAPH.items()
             if module == lower or module.startswith(lower + ".")
             for target, line in targets.items() if any(target == u or target.startswith(u + ".") for u in upper)]
    assert not wrong, "\n".join(wrong)


def test_every_import_points_down_the_layers():
    unplaced = [module for module in MODULES if _layer(module) is None]
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"
    wrong = [f"{module}:{line} ({_layer(module)}) imports {target} ({_layer(target)})"
             for module, targets in GRAPH.items() for target, line in targets.items()
             if RANK[_layer(target)] > RANK[_layer(module)]]
    assert not wrong, "imports that point up the layers (see this file's docstring):\n" + "\n".join(wrong)


MAX_LINES = 450


def test_no_module_is_longer_than_a_newcomer_reads_in_one_sitting():
    """Every file of the package stays under 450 lines: a file that grows past it has taken a second job."""
    long = {str(path.relative_to(PACKAGE.parent)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by job (lines): {long}"


def test_no_optimizer_feature_is_discovered_by_getattr():
    """Optional optimizer features are methods of the protocol (moetrain.optim.TrainOptimizer), not probed for."""
    probes = []
    for path in (PACKAGE / "training").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if ("getattr(" in line or "hasattr(" in line) and ("optimizer" in line or "opt," in line or "opt)" in line):
                probes.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not probes, "\n".join(probes)


def test_models_keep_no_thread_local_or_global_state():
    """``models/`` is pure: no thread-local, no ``global`` statement (state passes as arguments, e.g. recomputing)."""
    found = [f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
             for path in (PACKAGE / "models").rglob("*.py")
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if "threading.local" in line or line.lstrip().startswith("global ")]
    assert not found, "\n".join(found)


# Public functions whose positional parameters are fixed by something outside this package, or are one
# parallel group that reads best in order: (file, name) -> the positional parameters allowed.
POSITIONAL_ALLOWED = {
    # the seam's ExpertWeights.run protocol method and its implementations (models/seam.py)
    ("moetrain/models/seam.py", "run"): 5,
    ("moetrain/offload/weight_pager.py", "run"): 5,
    ("moetrain/offload/paged_experts.py", "run_paged"): 6,  # the pager, then run's parameters
    # a Jinja filter: the template engine passes json's arguments by position
    ("moetrain/training/chat.py", "tojson"): 5,
    # AdamW over four parallel lists (or tensors) of the same experts: params, grads, exp_avgs, exp_avg_sqs
    ("moetrain/offload/adam.py", "fused_adamw"): 4,
    ("moetrain/offload/adam.py", "reference_adamw"): 4,
    ("moetrain/offload/adam.py", "adamw"): 4,
    ("moetrain/offload/adam.py", "step"): 4,
    ("moetrain/offload/adam_cuda_order.py", "step"): 4,
}


def _framework_signature(name: str) -> bool:
    """Signatures torch and Lightning call: nn.Module/autograd.Function forward and backward, Lightning hooks."""
    return name in ("forward", "backward") or name.startswith("on_")


def test_public_functions_take_at_most_three_positional_parameters():
    """Past three (self, cls and ctx not counted), parameters are keyword-only so that call sites read by name."""
    wide = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = str(path.relative_to(PACKAGE.parent).as_posix())
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            if _framework_signature(node.name):
                continue
            positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls", "ctx")]
            if len(positional) > POSITIONAL_ALLOWED.get((where, node.name), 3):
                wide.append(f"{where}:{node.lineno} {node.name}({', '.join(positional)})")
    assert not wide, "make the parameters past the third keyword-only (`*`):\n" + "\n".join(wide)
