"""Modelling code that ``moetrain export`` writes next to the weights of families transformers has no class for.

Each sub-package holds the files named by the ``auto_map`` of the family's ``config.json`` (see
:data:`moetrain.models.hf_configs.REMOTE_CODE`); they are copied verbatim into the export, where transformers
imports them with ``trust_remote_code=True``. They import only transformers, never moetrain.
"""
