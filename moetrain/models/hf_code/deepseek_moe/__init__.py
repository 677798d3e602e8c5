"""DeepSeek-MoE (v1) for transformers: ``configuration_deepseek.py`` and ``modeling_deepseek.py``."""
