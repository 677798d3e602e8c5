"""Write a random Hugging Face model directory of any preset's exact shape and key layout, streaming.

Real-size input for ``model.init_from``, ``moetrain plan`` and ``moetrain.from_pretrained`` without a download:
sharded safetensors with the family's on-disk names, ``model.safetensors.index.json``, ``config.json`` and the
shipped tokenizer (see :mod:`moetrain.models.random_hf`).

    python scripts/make_random_hf.py --preset deepseek-moe-16b --dtype bf16 --out models/random-deepseek-moe-16b
    python scripts/make_random_hf.py --preset olmoe-1b-7b --layers 2 --out /tmp/olmoe-2l     # a quick cut
    python scripts/make_random_hf.py --preset tiny-deepseek-moe --set vocab_size=768 --out /tmp/tiny-hf

Values are drawn on the GPU when one is visible (``--device cpu`` forces every CPU core instead).
"""

from __future__ import annotations

import sys

from moetrain.models.random_hf import main

if __name__ == "__main__":
    sys.exit(main())
