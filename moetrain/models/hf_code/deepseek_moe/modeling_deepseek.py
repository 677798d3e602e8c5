"""DeepSeek-MoE (v1) for transformers, written by ``moetrain export`` next to the weights.

Load the directory with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. The tensor
names are those of deepseek-ai/deepseek-moe-16b-base. Llama's decoder provides attention, norms, rotary
embedding, cache and generation; only the MLP of MoE layers differs: a softmax router picks
``num_experts_per_tok`` of ``n_routed_experts`` SwiGLU experts (weights renormalised when ``norm_topk_prob``),
and ``n_shared_experts`` experts' worth of a shared SwiGLU sees every token. Layer ``i`` is an MoE layer when
``i >= first_k_dense_replace`` and ``i % moe_layer_freq == 0``.

Differences from DeepSeek's own file: the router's softmax runs in fp32 whatever the weights' dtype (as
moetrain trains it), and no auxiliary loss is computed (this file is for inference).
"""

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

from .configuration_deepseek import DeepseekConfig


class DeepseekMLP(nn.Module):
    """A SwiGLU of width ``intermediate_size``: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DeepseekMoE(nn.Module):
    """Routed experts chosen per token by a softmax top-k router, plus the shared experts."""

    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = bool(getattr(config, "norm_topk_prob", False))
        width = config.moe_intermediate_size
        # nn.Linear's parameter is named weight: the checkpoint's mlp.gate.weight (E, H)
        self.gate = nn.Linear(config.hidden_size, config.n_routed_experts, bias=False)
        self.experts = nn.ModuleList(DeepseekMLP(config.hidden_size, width) for _ in range(config.n_routed_experts))
        shared = getattr(config, "n_shared_experts", None)
        self.shared_experts = DeepseekMLP(config.hidden_size, width * shared) if shared else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, H)
        probs = nn.functional.linear(x.float(), self.gate.weight.float()).softmax(dim=-1)  # (T, E)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (T, k)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)  # the tokens that picked expert e, and in which of their k slots
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None].to(x.dtype))
        out = out.view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out


def is_moe_layer(config: DeepseekConfig, layer_idx: int) -> bool:
    """DeepSeek-MoE's rule: dense before ``first_k_dense_replace``, then every ``moe_layer_freq``-th layer."""
    return (getattr(config, "n_routed_experts", None) is not None
            and layer_idx >= getattr(config, "first_k_dense_replace", 0)
            and layer_idx % getattr(config, "moe_layer_freq", 1) == 0)


class DeepseekDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer, with the MoE block as its MLP on MoE layers."""

    def __init__(self, config: DeepseekConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        if is_moe_layer(config, layer_idx):
            self.mlp = DeepseekMoE(config)


class DeepseekModel(LlamaModel):
    """Llama's decoder stack built from :class:`DeepseekDecoderLayer`.

    Llama's constructor builds its own layers first (on the meta device when loading with from_pretrained, so
    without memory); reusing it keeps this file working across transformers versions.
    """

    config_class = DeepseekConfig
    _no_split_modules = ["DeepseekDecoderLayer"]

    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()


class DeepseekForCausalLM(LlamaForCausalLM):
    """DeepSeek-MoE with its language-model head; generation and the KV cache are Llama's."""

    config_class = DeepseekConfig
    _no_split_modules = ["DeepseekDecoderLayer"]

    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__(config)
        self.model = DeepseekModel(config)
        self.post_init()
