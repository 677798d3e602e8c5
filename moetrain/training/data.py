"""Text data: JSONL documents, tokenized, packed into fixed-length sequences with document ids.

Packing concatenates documents, each followed by EOS, into one token stream and cuts it into
sequences of ``seq_len`` tokens. ``document_ids`` keep attention inside each document and
``position_ids`` restart at every document, so a packed row trains exactly like its documents
would alone. The first token of a document is not a target of the previous document's last
token (its label is ignored).

The per-record step (``encode_records``) turns a JSON record into token ids and a loss mask; a
prompt/completion or chat format only needs another record encoder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from moetrain.models.decoder import IGNORE_INDEX
from moetrain.training.tokenizer import TextTokenizer, load_tokenizer


class DataError(ValueError):
    """A data file is missing or a record is malformed; the message names the file and line."""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, record)`` for every non-blank line of a JSONL file (1-based lines).

    Raises:
        DataError: the file is missing, or a line is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found; check data.path (relative paths start at the current directory)")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({err.msg} at column {err.colno}); "
                                "each line must be one JSON object such as {\"text\": \"...\"}; fix or remove "
                                "that line") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}; "
                                "each line must look like {\"text\": \"...\"}")
            yield lineno, record


def encode_records(
    path: str | Path, tokenizer: TextTokenizer, text_field: str = "text"
) -> list[tuple[list[int], list[bool]]]:
    """Token ids and loss mask (True = trained on) of every document of a ``text`` JSONL file.

    Raises:
        DataError: a record lacks ``text_field`` or it is not a string, or the file holds no document.
    """
    texts = []
    for lineno, record in read_jsonl(path):
        text = record.get(text_field)
        if not isinstance(text, str):
            found = "missing" if text_field not in record else f"a {type(text).__name__}"
            raise DataError(f"{path}, line {lineno}: field {text_field!r} is {found}; every line needs a string "
                            f"{text_field!r} field (keys found: {', '.join(sorted(record)) or 'none'})")
        texts.append(text)
    if not texts:
        raise DataError(f"{path}: no documents; the file is empty")
    return [(ids, [True] * len(ids)) for ids in tokenizer.encode_batch(texts)]


@dataclass
class PackedSequences:
    """Packed training rows; every tensor is (N, L) int64.

    Attributes:
        input_ids: token ids.
        labels: targets aligned with ``input_ids`` (the model shifts them); IGNORE_INDEX where not trained.
        document_ids: 0, 1, ... per document inside each row.
        position_ids: position inside the document, restarting at 0 at every document and every row.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    document_ids: torch.Tensor
    position_ids: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pack_documents(docs: list[tuple[list[int], list[bool]]], seq_len: int, eos_id: int) -> PackedSequences:
    """Concatenate ``(ids, loss_mask)`` documents, each followed by EOS, into rows of ``seq_len`` tokens.

    The tail that does not fill a row is dropped.

    Raises:
        DataError: the documents hold fewer than ``seq_len`` tokens.
    """
    ids: list[int] = []
    trained: list[bool] = []
    doc_of: list[int] = []
    for d, (doc_ids, mask) in enumerate(docs):
        ids.extend(doc_ids)
        ids.append(eos_id)
        trained.extend(mask)
        trained.append(True)  # the model learns to end a document
        doc_of.extend([d] * (len(doc_ids) + 1))
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"the data holds {len(ids)} tokens, fewer than one sequence of data.seq_len={seq_len}; "
                        "add documents or lower data.seq_len")
    cut = n * seq_len
    input_ids = torch.tensor(ids[:cut], dtype=torch.long).view(n, seq_len)  # (N, L)
    doc = torch.tensor(doc_of[:cut], dtype=torch.long).view(n, seq_len)  # (N, L) global document index
    starts = torch.ones_like(doc, dtype=torch.bool)  # (N, L) True where a document starts in the row
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    document_ids = torch.cumsum(starts.long(), dim=1) - 1  # (N, L) 0-based inside each row
    arange = torch.arange(seq_len).expand(n, -1)  # (N, L)
    segment_start = torch.cummax(torch.where(starts, arange, torch.zeros_like(arange)), dim=1).values
    position_ids = arange - segment_start  # (N, L)
    labels = input_ids.clone()
    labels[~torch.tensor(trained[:cut]).view(n, seq_len)] = IGNORE_INDEX
    # the model predicts labels[t] from position t - 1: never across a document boundary
    labels[:, 1:][starts[:, 1:]] = IGNORE_INDEX
    return PackedSequences(input_ids, labels, document_ids, position_ids.contiguous())


class PackedDataset(Dataset):
    """Rows of :class:`PackedSequences` as dicts of (L,) tensors."""

    def __init__(self, packed: PackedSequences) -> None:
        self.packed = packed

    def __len__(self) -> int:
        return len(self.packed)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        p = self.packed
        return {"input_ids": p.input_ids[i], "labels": p.labels[i], "document_ids": p.document_ids[i],
                "position_ids": p.position_ids[i]}


class EpochShuffleSampler(Sampler[int]):
    """A permutation of the rows that depends only on ``seed`` and the epoch (Lightning calls ``set_epoch``).

    Shuffling does not touch the global RNG, so model initialisation and data order are independent.
    """

    def __init__(self, num_rows: int, seed: int, shuffle: bool = True) -> None:
        self.num_rows = num_rows
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_rows))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_rows, generator=gen).tolist())


class TextDataModule(L.LightningDataModule):
    """Packed causal-LM data from JSONL files with a ``text`` field (the ``data:`` section of a recipe)."""

    def __init__(
        self,
        path: str,
        tokenizer: str,
        seq_len: int = 512,
        micro_batch_size: int = 4,
        val_path: Optional[str] = None,
        text_field: str = "text",
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            path: training JSONL file, one ``{"text": ...}`` object per line.
            tokenizer: Hugging Face tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``).
            seq_len: tokens per packed sequence.
            micro_batch_size: sequences per forward/backward pass.
            val_path: optional validation JSONL file (``moetrain validate``).
            text_field: name of the text field in each record.
            shuffle: shuffle rows every epoch (deterministic from ``seed`` and the epoch).
            seed: data order seed.
            num_workers: DataLoader worker processes (rows are pre-packed, so 0 is usually enough).
        """
        super().__init__()
        for key, value in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size)):
            if value <= 0:
                raise DataError(f"data.{key} must be positive, got {value}")
        for key, value in (("path", path), ("val_path", val_path)):
            if value is not None and not Path(value).is_file():
                raise DataError(f"data.{key}: file {value} not found (relative paths start at the current "
                                "directory); point it at a JSONL file with one {\"text\": ...} object per line")
        self.path = path
        self.val_path = val_path
        self.tokenizer_path = tokenizer
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.text_field = text_field
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer: Optional[TextTokenizer] = None
        self.train_set: Optional[PackedDataset] = None
        self.val_set: Optional[PackedDataset] = None

    def load_tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_path)
        return self.tokenizer

    def _packed(self, path: str) -> PackedDataset:
        tok = self.load_tokenizer()
        return PackedDataset(pack_documents(encode_records(path, tok, self.text_field), self.seq_len, tok.eos_id))

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._packed(self.path)
        if stage in (None, "fit", "validate") and self.val_path is not None and self.val_set is None:
            self.val_set = self._packed(self.val_path)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "setup('fit') first"
        sampler = EpochShuffleSampler(len(self.train_set), self.seed, self.shuffle)
        return DataLoader(self.train_set, batch_size=self.micro_batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []  # type: ignore[return-value]  # Lightning skips validation on an empty list
        return DataLoader(self.val_set, batch_size=self.micro_batch_size, shuffle=False, num_workers=self.num_workers)
