"""Load Hugging Face checkpoints of the supported MoE families into :class:`MoEForCausalLM`, and export back.

Loading streams: the model is built on the meta device, materialised empty in the target dtype, and
each tensor is copied into its parameter as its shard is read, so no full state dict is ever held.
Both on-disk expert layouts are accepted:

* per expert (what every published checkpoint and transformers' ``save_pretrained`` write):
  ``model.layers.{i}.mlp.experts.{e}.gate_proj.weight`` (I, H) ... (Mixtral: ``block_sparse_moe``
  and ``w1``/``w3``/``w2``);
* fused (transformers-5's in-memory layout, e.g. a raw ``save_file(model.state_dict())``):
  ``model.layers.{i}.mlp.experts.gate_up_proj`` (E, 2I, H) with gate rows first, and
  ``model.layers.{i}.mlp.experts.down_proj`` (E, H, I).

Export writes the family's per-expert layout with ``config.json`` (see :mod:`moetrain.models.hf_configs`)
and ``moetrain_config.json``, which keeps the fields no config.json can hold (the router z-loss, the name).
A family transformers has no class for (DeepSeek-MoE v1) also gets its modelling files
(:mod:`moetrain.models.hf_code`), which config.json's ``auto_map`` names, so the export loads with
``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``.
A moetrain checkpoint directory has the same layout, so :func:`from_pretrained` loads both, and a run
directory too (its newest complete checkpoint, ``checkpoints/last``).

The work is in three modules: :mod:`moetrain.models.hf_files` (the directory layout and its config),
:mod:`moetrain.models.hf_load` (loading) and :mod:`moetrain.models.hf_export` (exporting); this module is their one
import for callers.
"""

from moetrain.models.hf_configs import config_from_hf, config_to_hf
from moetrain.models.hf_export import (
    convert_checkpoint,
    export_hf,
    export_main,
    hf_named_tensors,
    load_hint,
    write_model_code,
)
from moetrain.models.hf_files import (
    CHECKPOINTS_DIR,
    HF_CONFIG,
    LAST_FILE,
    MOETRAIN_CONFIG,
    TOKENIZER_FILES,
    DType,
    load_config,
    resolve_checkpoint,
    resolve_model_path,
)
from moetrain.models.hf_load import (
    checked_tensors,
    empty_model,
    from_pretrained,
    iter_checkpoint,
    load_weights,
    state_shapes,
)

__all__ = ["CHECKPOINTS_DIR", "HF_CONFIG", "LAST_FILE", "MOETRAIN_CONFIG", "TOKENIZER_FILES", "DType",
           "checked_tensors", "config_from_hf", "config_to_hf", "convert_checkpoint", "empty_model", "export_hf",
           "export_main", "from_pretrained", "hf_named_tensors", "iter_checkpoint", "load_config", "load_hint",
           "load_weights", "resolve_checkpoint", "resolve_model_path", "state_shapes", "write_model_code"]
