"""A local Hugging Face tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``).

Only the fast ``tokenizers`` library is needed: no network, no ``transformers`` import at training time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from moetrain.config import ConfigError

# tried in order when tokenizer_config.json names no eos_token
_EOS_FALLBACKS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


@dataclass
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` and the id of its end-of-sequence token."""

    tokenizer: Tokenizer
    eos_id: int
    path: Path

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (special tokens included)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (the packer adds EOS)."""
        return [enc.ids for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _eos_name(config_path: Path) -> str | None:
    if not config_path.exists():
        return None
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config_path}: not valid JSON (line {err.lineno}): {err.msg}; fix or delete the "
                          "file") from None
    eos = config.get("eos_token")
    if isinstance(eos, dict):  # {"content": "</s>", ...} as older transformers versions write it
        eos = eos.get("content")
    return eos


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """Load the tokenizer directory ``path`` (or a ``tokenizer.json`` file).

    Raises:
        ConfigError: the directory or file is missing, unreadable, or names no usable EOS token.
    """
    path = Path(path)
    file = path if path.suffix == ".json" else path / "tokenizer.json"
    if not file.exists():
        raise ConfigError(f"tokenizer file {file} not found; set data.tokenizer to a Hugging Face tokenizer directory "
                          "holding tokenizer.json (scripts/make_tiny_data.py shows how to train one)")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a plain Exception with the serde message
        raise ConfigError(f"{file}: cannot load tokenizer ({err}); the file is not a tokenizers JSON file") from None
    eos = _eos_name(file.parent / "tokenizer_config.json")
    candidates = (eos,) if eos else _EOS_FALLBACKS
    for name in candidates:
        eos_id = tokenizer.token_to_id(name)
        if eos_id is not None:
            return TextTokenizer(tokenizer, eos_id, file.parent)
    raise ConfigError(f"{file}: no end-of-sequence token (looked for {', '.join(candidates)}); set eos_token in "
                      f"{file.parent / 'tokenizer_config.json'}")
