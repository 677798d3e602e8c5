"""Hugging Face ``config.json`` <-> :class:`~moetrain.config.ModelConfig`, one converter pair per family.

Reading accepts both the transformers-4 spelling (``rope_theta``, ``rope_scaling``) and the
transformers-5 spelling (``rope_parameters``, ``num_local_experts`` for Qwen3-MoE). DeepSeek-V2/V3
(``deepseek_v2``/``deepseek_v3``) bring YaRN rope scaling, MLA shapes and their routers. Options that
moetrain does not implement (rope scaling outside DeepSeek-V2/V3, non-softmax scoring in the others,
qkv clipping, Qwen's per-layer sliding window, router jitter, ...) are refused with a
:class:`ConfigError` naming the key, rather than silently producing a different model.

Writing produces the key set of the family's published checkpoints (for ``deepseek_moe``: exactly
the keys, ``model_type``, ``architectures`` and ``auto_map`` of deepseek-ai/deepseek-moe-16b-base),
so an exported directory loads in transformers. transformers has no DeepSeek-MoE (v1) class: its
``auto_map`` names modelling files that must sit next to config.json, so it is written only on request
(``with_code=True``), by writers that also copy those files (:data:`REMOTE_CODE`, :mod:`moetrain.models.hf_code`).

The readers are in :mod:`moetrain.models.hf_config_read`, the writers in :mod:`moetrain.models.hf_config_write`;
this module is the pair's one import.
"""

from moetrain.models.hf_config_read import HF_MODEL_TYPES, config_from_hf
from moetrain.models.hf_config_write import DEEPSEEK_AUTO_MAP, REMOTE_CODE, config_to_hf, remote_code_files

__all__ = ["DEEPSEEK_AUTO_MAP", "HF_MODEL_TYPES", "REMOTE_CODE", "config_from_hf", "config_to_hf", "remote_code_files"]
