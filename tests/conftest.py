"""Shared fixtures: deterministic seeds, parameter re-drawing, and tiny random Hugging Face models of each
family (saved as sharded checkpoints by ``save_hf``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

TINY_HF_VOCAB = 128
_BASE = dict(vocab_size=TINY_HF_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)
TINY_HF_CASES = ("mixtral", "mixtral_sliding", "qwen2_moe", "qwen2_moe_sparse_step", "qwen3_moe", "olmoe",
                 "deepseek_v2", "deepseek_v2_group", "deepseek_v3")
# DeepSeek-V2/V3: multi-head latent attention shapes (qk 8 nope + 8 rotary, v 12), YaRN with both mscales set
_MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_shared_experts=1,
            moe_intermediate_size=16, first_k_dense_replace=1, max_position_embeddings=256)
TINY_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
             "mscale": 0.9, "mscale_all_dim": 0.8}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _keep_threads():
    """``moetrain.cli.main`` called in-process applies a recipe's ``cpu_threads`` (the tiny recipe: 1) to this
    process: put torch's thread count back after every test so that it never leaks into the next."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def repo_cwd(monkeypatch):
    """Recipes name their data relative to the repository: run from there."""
    monkeypatch.chdir(REPO)


@pytest.fixture
def run_main(capsys, monkeypatch):
    """Run ``moetrain`` in-process from the repository root; returns (exit status, stderr)."""
    from moetrain.cli import main

    monkeypatch.chdir(REPO)
    threads = torch.get_num_threads()

    def _run(*args: str) -> tuple[int, str]:
        try:
            code = main(list(args))
        finally:
            torch.set_num_threads(threads)  # the recipe's cpu_threads must not leak into the next call
        return code, capsys.readouterr().err

    return _run


def _randomize(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Re-draw every parameter so that no test passes on an initialisation symmetry: matrices N(0, std),
    norm weights 1 + N(0, std), other vectors (biases) N(0, std). Routers get decisive, untied logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            elif "norm" in name:
                p.copy_(1.0 + std * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model


def _tiny_hf(case: str):
    """A tiny random transformers model of ``case`` (one of TINY_HF_CASES) exercising the family's features."""
    import transformers

    if case in ("mixtral", "mixtral_sliding"):
        window = 4 if case == "mixtral_sliding" else None
        cfg = transformers.MixtralConfig(**_BASE, num_local_experts=4, num_experts_per_tok=2, sliding_window=window)
        cls = transformers.MixtralForCausalLM
    elif case == "qwen2_moe":  # gated shared expert, qkv bias, layer 1 dense via mlp_only_layers
        cfg = transformers.Qwen2MoeConfig(**{**_BASE, "num_hidden_layers": 3}, num_experts=8, num_experts_per_tok=2,
                                          moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                          mlp_only_layers=[1], norm_topk_prob=False)
        cls = transformers.Qwen2MoeForCausalLM
    elif case == "qwen2_moe_sparse_step":  # decoder_sparse_step 2: layers 1 and 3 MoE, 0 and 2 dense
        cfg = transformers.Qwen2MoeConfig(**{**_BASE, "num_hidden_layers": 4}, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                          decoder_sparse_step=2, norm_topk_prob=True)
        cls = transformers.Qwen2MoeForCausalLM
    elif case == "qwen3_moe":  # head_dim 16 != 32 / 4, per-head q/k norm, renormalised top-k
        cfg = transformers.Qwen3MoeConfig(**_BASE, head_dim=16, num_experts=8, num_experts_per_tok=2,
                                          moe_intermediate_size=16, norm_topk_prob=True)
        cls = transformers.Qwen3MoeForCausalLM
    elif case == "olmoe":  # RMSNorm over the full q/k projections
        cfg = transformers.OlmoeConfig(**_BASE, num_experts=8, num_experts_per_tok=2, eos_token_id=2, pad_token_id=1)
        cls = transformers.OlmoeForCausalLM
    elif case == "deepseek_v2":  # DeepSeek-V2-Lite's layout: no query latent, softmax greedy top-k, plain rope
        cfg = transformers.DeepseekV2Config(**{**_BASE, "num_hidden_layers": 3, "num_key_value_heads": 4}, **_MLA,
                                            n_routed_experts=8, num_experts_per_tok=2, q_lora_rank=None,
                                            topk_method="greedy")
        cls = transformers.DeepseekV2ForCausalLM
    elif case == "deepseek_v2_group":  # query latent, group-limited top-2 (1 of 2 groups), routed scaling, YaRN
        cfg = transformers.DeepseekV2Config(**{**_BASE, "num_hidden_layers": 3, "num_key_value_heads": 4}, **_MLA,
                                            n_routed_experts=8, num_experts_per_tok=2, q_lora_rank=24,
                                            topk_method="group_limited_greedy", n_group=2, topk_group=1,
                                            routed_scaling_factor=1.5, rope_scaling=dict(TINY_YARN))
        cls = transformers.DeepseekV2ForCausalLM
    elif case == "deepseek_v3":  # sigmoid noaux_tc routing with a non-zero correction bias, YaRN
        cfg = transformers.DeepseekV3Config(**{**_BASE, "num_hidden_layers": 3, "num_key_value_heads": 4}, **_MLA,
                                            n_routed_experts=8, num_experts_per_tok=2, q_lora_rank=24, n_group=4,
                                            topk_group=2, routed_scaling_factor=2.5, rope_scaling=dict(TINY_YARN))
        cls = transformers.DeepseekV3ForCausalLM
    else:
        raise ValueError(f"unknown tiny model case {case!r}; choose one of {TINY_HF_CASES}")
    model = _randomize(cls(cfg)).eval()
    if case == "deepseek_v3":  # a bias of the size of the sigmoid scores' spread, so that it changes choices
        with torch.no_grad():
            for layer in model.model.layers[cfg.first_k_dense_replace:]:
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.3)
    return model


@pytest.fixture
def randomize():
    """``randomize(model, std=0.1)``: re-draw all parameters in place; returns the model."""
    return _randomize


@pytest.fixture
def tiny_hf():
    """``tiny_hf(case)``: a tiny random transformers MoE model in eval mode (see TINY_HF_CASES)."""
    return _tiny_hf


@pytest.fixture
def save_hf(tmp_path):
    """``save_hf(hf_model, name)``: save_pretrained into tmp_path/name in ~100 KB shards; returns the path."""

    def _save(hf_model, name: str = "hf", max_shard_size: str = "100KB"):
        out = tmp_path / name
        hf_model.save_pretrained(out, max_shard_size=max_shard_size)
        return out

    return _save


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
"""This session is the child one of :func:`run_interpreted`: Triton kernels run interpreted on CPU tensors."""


@pytest.fixture(scope="module")
def interpreted():
    """A kernel test module's interpreted tests run in the child session of :func:`run_interpreted` only (Triton
    kernels on CPU tensors); elsewhere they skip."""
    if not INTERPRETING:
        pytest.skip("runs in the child session under TRITON_INTERPRET=1 (test_kernels_under_the_interpreter)")
    pytest.importorskip("triton")
    from moetrain.models.kernel_switch import triton_importable

    assert triton_importable()


@pytest.fixture
def run_interpreted():
    """``run(test_file, *, select=None, timeout=600)``: the test file's kernel tests in a child pytest that turns
    Triton's interpreter on before triton is imported (``-k select`` where given); fails with the child's output
    unless it passes. In the child session itself, or without triton, the test skips."""
    if INTERPRETING:
        pytest.skip("this is the child session")
    pytest.importorskip("triton")

    def run(test_file: str, *, select: str | None = None, timeout: int = 600) -> None:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-k", select] if select else []),
               test_file]
        child = subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=REPO, capture_output=True,
                               text=True, timeout=timeout)
        assert child.returncode == 0, child.stdout[-20000:] + child.stderr[-5000:]
        assert " passed" in child.stdout, child.stdout[-2000:]

    return run
