"""DeepSeek-MoE (v1) configuration for transformers, written by ``moetrain export`` next to the weights.

The attention, norms and rotary embedding are Llama's, so the config is Llama's plus DeepSeek's MoE keys
(``n_routed_experts``, ``n_shared_experts``, ``moe_intermediate_size``, ``first_k_dense_replace``,
``moe_layer_freq``, ``norm_topk_prob``, ...), which config.json carries and transformers keeps as attributes.
"""

from transformers import LlamaConfig


class DeepseekConfig(LlamaConfig):
    """The ``deepseek`` model type of deepseek-ai/deepseek-moe-16b-base's config.json."""

    model_type = "deepseek"
