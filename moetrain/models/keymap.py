"""Parameter names: moetrain's internal names versus each family's Hugging Face checkpoint names.

Internal names follow the common Hugging Face layout (``model.layers.{i}.mlp.experts.{e}.gate_proj``).
Only Mixtral differs on disk: ``block_sparse_moe.gate`` and experts ``w1`` (gate), ``w3`` (up),
``w2`` (down).
"""

from __future__ import annotations

import re

_MIXTRAL_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_MIXTRAL_EXPERT_INV = {v: k for k, v in _MIXTRAL_EXPERT.items()}
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_HF_MIXTRAL_EXPERT_RE = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


def to_hf_name(family: str, name: str) -> str:
    """The Hugging Face checkpoint name of internal parameter ``name``."""
    if family != "mixtral":
        return name
    m = _EXPERT_RE.match(name)
    if m:
        return f"{m.group(1)}.block_sparse_moe.experts.{m.group(2)}.{_MIXTRAL_EXPERT[m.group(3)]}.weight"
    return name.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")


def from_hf_name(family: str, name: str) -> str:
    """The internal parameter name of Hugging Face checkpoint name ``name``."""
    if family != "mixtral":
        return name
    m = _HF_MIXTRAL_EXPERT_RE.match(name)
    if m:
        return f"{m.group(1)}.mlp.experts.{m.group(2)}.{_MIXTRAL_EXPERT_INV[m.group(3)]}.weight"
    return name.replace(".block_sparse_moe.gate.weight", ".mlp.gate.weight")
