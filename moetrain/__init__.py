"""moetrain: full fine-tuning of Mixture-of-Experts language models on one GPU or a few.

The router runs on the GPU; only the routed experts' weights, gradients and Adam states are paged
in from pinned CPU memory or NVMe. See README.md.
"""

from moetrain.config import ConfigError, ModelConfig
from moetrain.models.decoder import MoEForCausalLM, MoEOutput

__version__ = "0.1.0"


def from_pretrained(path, expert_weights="resident", **kwargs):
    """Load a Hugging Face model directory of a supported family, a moetrain checkpoint, or a run directory
    (its newest complete checkpoint, ``checkpoints/last``).

    See :func:`moetrain.models.hf.from_pretrained`. ``expert_weights="paged"`` keeps the routed experts in host
    memory and pages the routed ones onto ``device`` (:func:`moetrain.inference.load_paged`, which takes the
    cache settings as keywords: ``gpu_memory_gb``, ``cache_slots``, ``cache_policy``, ``expert_dtype``,
    ``expert_source``).
    """
    if expert_weights != "resident":
        from moetrain.inference import load_paged

        return load_paged(path, expert_weights=expert_weights, **kwargs)
    from moetrain.models.hf import from_pretrained as _from_pretrained

    return _from_pretrained(path, **kwargs)


__all__ = ["ConfigError", "ModelConfig", "MoEForCausalLM", "MoEOutput", "from_pretrained", "__version__"]
