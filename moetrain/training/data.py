"""Training data: JSONL records, tokenized, then packed (or padded) into fixed-length rows.

Records are text, prompt/completion pairs, chat conversations or pretokenized ids
(:mod:`moetrain.training.records`); each becomes token ids and a loss mask, so only completion or
assistant tokens are trained.

Packing concatenates documents, each followed by EOS, into one token stream and cuts it into
sequences of ``seq_len`` tokens. ``document_ids`` keep attention inside each document and
``position_ids`` restart at every document, so a packed row trains exactly like its documents
would alone. The first token of a document is not a target of the previous document's last
token (its label is ignored).

Padding (``data.packing: false``) puts each document in its own row, padded to ``seq_len`` with an
``attention_mask``; padded positions are neither attended to, trained on, nor counted in the
router's auxiliary loss.

A document longer than ``seq_len`` (EOS included) is truncated and counted (``data.overlong:
truncate``); its cut end is not taught as an end of text. With packing, ``overlong: split`` lets it
flow on into the next row instead, as pre-training packers do.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from moetrain.models.decoder import IGNORE_INDEX
from moetrain.models.varlen import with_spans
from moetrain.training.chat import ChatTemplate
from moetrain.training.records import DataError, DataReport, Document, encode_file, iter_lines
from moetrain.training.sampler import ResumableSampler
from moetrain.training.tokenizer import TextTokenizer, load_tokenizer

__all__ = ["DataError", "DataReport", "TextDataModule", "encode_records", "pack_documents", "pad_documents"]


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, record)`` for every non-blank line of a JSONL file (1-based lines).

    Raises:
        DataError: the file is missing, or a line is not a JSON object.
    """
    for lineno, record in iter_lines(path):
        if isinstance(record, DataError):
            raise record
        yield lineno, record


def encode_records(path: str | Path, tokenizer: TextTokenizer, text_field: str = "text", *, fmt: str = "text",
                   **kwargs) -> list[Document]:
    """Token ids and loss mask (True = trained on) of every record of a JSONL file.

    ``fmt`` and the keyword arguments are those of :func:`moetrain.training.records.encode_file`.

    Raises:
        DataError: a malformed record, or the file holds no document.
    """
    return encode_file(path, tokenizer, fmt, text_field=text_field, **kwargs)


def truncate_documents(docs: list[Document], seq_len: int) -> tuple[list[Document], set[int], int]:
    """Cut documents that do not fit one row with their EOS.

    Returns:
        (documents, indices of the cut ones (their EOS is no target), how many were cut).
    """
    out, cut = [], set()
    for i, (ids, mask) in enumerate(docs):
        if len(ids) + 1 > seq_len:
            # keep seq_len - 1 tokens: the packer's EOS then keeps rows aligned to documents
            ids, mask = ids[: seq_len - 1], mask[: seq_len - 1]
            cut.add(i)
        out.append((ids, mask))
    return out, cut, len(cut)


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


def pack_documents(docs: list[tuple[list[int], list[bool]]], seq_len: int, eos_id: int,
                   *, untrained_eos: frozenset[int] | set[int] = frozenset()) -> PackedSequences:
    """Concatenate ``(ids, loss_mask)`` documents, each followed by EOS, into rows of ``seq_len`` tokens.

    The tail that does not fill a row is dropped. The EOS after a document whose index is in
    ``untrained_eos`` (a truncated one) is no training target.

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
        trained.append(d not in untrained_eos)  # the model learns to end a document (not a cut one)
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


def pad_documents(docs: list[Document], seq_len: int, eos_id: int,
                  *, untrained_eos: frozenset[int] | set[int] = frozenset()) -> dict[str, torch.Tensor]:
    """One row per document: its ids and EOS, then padding to ``seq_len`` (documents must fit: truncate first).

    Returns:
        ``input_ids``, ``labels`` (IGNORE_INDEX at untrained and padded positions), ``attention_mask``
        (1 real, 0 padding) and ``position_ids``, each (N, seq_len) int64.
    """
    n = len(docs)
    input_ids = torch.full((n, seq_len), eos_id, dtype=torch.long)  # (N, L); the pad value is never attended
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)  # (N, L)
    attention_mask = torch.zeros((n, seq_len), dtype=torch.long)  # (N, L)
    for i, (ids, mask) in enumerate(docs):
        row = torch.tensor(ids + [eos_id], dtype=torch.long)
        trained = torch.tensor(mask + [i not in untrained_eos])
        length = row.numel()
        if length > seq_len:
            raise DataError(f"document {i} has {length} tokens with its EOS, more than data.seq_len={seq_len}")
        input_ids[i, :length] = row
        labels[i, :length] = torch.where(trained, row, torch.full_like(row, IGNORE_INDEX))
        attention_mask[i, :length] = 1
    position_ids = torch.arange(seq_len).expand(n, -1).contiguous()  # (N, L)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}


class RowDataset(Dataset):
    """Rows of a dict of (N, L) tensors as dicts of (L,) tensors."""

    def __init__(self, rows: dict[str, torch.Tensor]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return next(iter(self.rows.values())).shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {key: value[i] for key, value in self.rows.items()}


def split_validation(docs: list[Document], fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Hold out ``fraction`` of the documents (at least one), chosen by a permutation seeded with ``seed``.

    Returns:
        (training documents, validation documents), each in file order.
    """
    if len(docs) < 2:
        raise DataError(f"data.val_split needs at least 2 documents to split, the training file has {len(docs)}")
    n_val = min(max(1, round(len(docs) * fraction)), len(docs) - 1)
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_val])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


EpochShuffleSampler = ResumableSampler  # the earlier name; the sampler lives in its own module now


class TextDataModule(L.LightningDataModule):
    """Causal-LM data from JSONL files (the ``data:`` section of a recipe)."""

    def __init__(
        self,
        path: str,
        tokenizer: str,
        seq_len: int = 512,
        micro_batch_size: int = 4,
        val_path: Optional[str] = None,
        val_split: float = 0.0,
        format: str = "auto",
        text_field: str = "text",
        chat_template: str = "auto",
        packing: bool = True,
        overlong: str = "truncate",
        on_error: str = "raise",
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            path: training JSONL file, one record per line.
            tokenizer: Hugging Face tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``).
            seq_len: tokens per row.
            micro_batch_size: rows per forward/backward pass.
            val_path: optional validation JSONL file (same format as ``path``).
            val_split: without ``val_path``, hold out this fraction of the training documents for validation.
            format: ``auto`` (from the first record's keys), ``text``, ``instruction`` (prompt/completion),
                ``chat`` (messages) or ``pretokenized`` (input_ids).
            text_field: name of the text field of the ``text`` format.
            chat_template: ``auto`` (the tokenizer's ``chat_template``, else ChatML) or ``default`` (ChatML).
            packing: pack documents into full rows (attention stays inside each document); False pads each
                document to its own row with an attention mask.
            overlong: ``truncate`` documents longer than ``seq_len`` (counted in the data report) or, with packing,
                ``split`` them over rows.
            on_error: ``raise`` stops at a malformed record naming the file and line; ``skip`` skips and counts it.
            shuffle: shuffle rows every epoch (deterministic from ``seed`` and the epoch).
            seed: data order seed (also picks the ``val_split`` documents).
            num_workers: DataLoader worker processes (rows are pre-built, so 0 is usually enough).
        """
        settings = {key: value for key, value in locals().items() if key not in ("self", "__class__")}
        super().__init__()
        for key, value in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size)):
            if value <= 0:
                raise DataError(f"data.{key} must be positive, got {value}")
        for key, value in (("path", path), ("val_path", val_path)):
            if value is not None and not Path(value).is_file():
                raise DataError(f"data.{key}: file {value} not found (relative paths start at the current "
                                "directory); point it at a JSONL file with one {\"text\": ...} object per line")
        choices = {"format": (format, ("auto", "text", "instruction", "chat", "pretokenized")),
                   "chat_template": (chat_template, ("auto", "default")),
                   "overlong": (overlong, ("truncate", "split") if packing else ("truncate",)),
                   "on_error": (on_error, ("raise", "skip"))}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise DataError(f"data.{key}={value!r}: choose one of {', '.join(allowed)}"
                                + (" (split needs data.packing: true)" if key == "overlong" else ""))
        if not 0.0 <= val_split < 1.0:
            raise DataError(f"data.val_split must be in [0, 1), got {val_split}")
        if val_split and val_path is not None:
            raise DataError("set data.val_path or data.val_split, not both")
        self.path = path
        self.val_path = val_path
        self.val_split = val_split
        self.tokenizer_path = tokenizer
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.format = format
        self.text_field = text_field
        self.chat_template = chat_template
        self.packing = packing
        self.overlong = overlong
        self.on_error = on_error
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer: Optional[TextTokenizer] = None
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.reports: dict[str, DataReport] = {}
        """Per split (``train``, ``val``): what reading its data did (documents, skipped lines, truncations)."""
        self.settings = settings
        """The constructor's arguments: two data modules with equal settings prepare the same splits."""

    def load_tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_path)
        return self.tokenizer

    def _read(self, path: str, report: DataReport) -> list[Document]:
        tok = self.load_tokenizer()
        chat = ChatTemplate.from_tokenizer_dir(tok.path, use_template=self.chat_template == "auto")
        return encode_records(path, tok, self.text_field, fmt=self.format, chat=chat, on_error=self.on_error,
                              report=report)

    def _rows(self, docs: list[Document], report: DataReport) -> Dataset:
        """Truncate, then pack or pad; fills the report's token and row counts."""
        eos = self.load_tokenizer().eos_id
        cut: set[int] = set()
        if self.overlong == "truncate":
            docs, cut, report.truncated = truncate_documents(docs, self.seq_len)
            # a conversation cut before its first answer has nothing to train; a batch of such rows would
            # make the mean cross-entropy 0/0
            keep = [i for i, (_, mask) in enumerate(docs) if any(mask) or i not in cut]
            report.untrained = len(docs) - len(keep)
            if not keep:
                raise DataError(f"{report.path}: every document loses all its trained tokens when truncated to "
                                f"data.seq_len={self.seq_len}; raise data.seq_len")
            cut = {new for new, old in enumerate(keep) if old in cut}
            docs = [docs[i] for i in keep]
        report.documents = len(docs)
        report.tokens = sum(len(ids) + 1 for ids, _ in docs)
        report.trained_tokens = sum(sum(mask) + (i not in cut) for i, (_, mask) in enumerate(docs))
        if self.packing:
            dataset: Dataset = PackedDataset(pack_documents(docs, self.seq_len, eos, untrained_eos=cut))
        else:
            dataset = RowDataset(pad_documents(docs, self.seq_len, eos, untrained_eos=cut))
        report.rows = len(dataset)  # type: ignore[arg-type]
        return dataset

    def _packed(self, path: str) -> Dataset:
        report = DataReport(path)
        return self._rows(self._read(path, report), report)

    def prepare(self, stage: Optional[str] = None) -> None:
        """Read, tokenize and pack the splits that ``stage`` uses and are not prepared yet (:meth:`setup` without
        the data report); the preflight calls it before the model is built.

        Raises:
            DataError: a malformed record, or a split too small for one row of ``seq_len``.
        """
        needs_train = stage in (None, "fit") and self.train_set is None
        needs_val = stage in (None, "fit", "validate") and self.val_set is None and (self.val_path or self.val_split)
        if needs_train or (needs_val and self.val_split):
            train = self.reports["train"] = DataReport(self.path)
            docs = self._read(self.path, train)
            if self.val_split:
                docs, held = split_validation(docs, self.val_split, self.seed)
                val = self.reports["val"] = DataReport(f"{self.path} (val_split={self.val_split})", train.format)
                self.val_set = self._rows(held, val)
            self.train_set = self._rows(docs, train)
        if needs_val and self.val_path is not None:
            val = self.reports["val"] = DataReport(self.val_path)
            self.val_set = self._rows(self._read(self.val_path, val), val)

    def adopt(self, prepared: TextDataModule) -> bool:
        """Take the tokenizer, splits and reports of ``prepared`` (a data module that ran :meth:`prepare`) when its
        settings equal this one's, so that :meth:`setup` does not read and tokenize the data again.

        The preflight prepares the data before the model is built (a data error then costs no model build) and the
        CLI hands that data module to the one LightningCLI instantiates from the ``data:`` section: the prepared
        data is passed explicitly, not held in a cache on the class, so no other data module can pick it up.

        Returns:
            whether ``prepared`` was adopted (False: different settings; :meth:`setup` prepares the data itself).
        """
        if prepared.settings != self.settings:
            return False
        self.tokenizer = prepared.tokenizer
        self.train_set, self.val_set = prepared.train_set, prepared.val_set
        self.reports = dict(prepared.reports)
        return True

    def setup(self, stage: Optional[str] = None) -> None:
        self.prepare(stage)
        if self.trainer is None or self.trainer.is_global_zero:
            for name, report in self.reports.items():
                print(f"data ({name}): {report.summary()}", file=sys.stderr)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "setup('fit') first"
        sampler = EpochShuffleSampler(len(self.train_set), self.seed, self.shuffle)
        return DataLoader(self.train_set, batch_size=self.micro_batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, collate_fn=collate_rows, pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []  # type: ignore[return-value]  # Lightning skips validation on an empty list
        return DataLoader(self.val_set, batch_size=self.micro_batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate_rows, pin_memory=torch.cuda.is_available())


def collate_rows(rows: list[dict[str, torch.Tensor]]) -> dict:
    """A micro-batch of rows: (B, L) tensors, and the packed documents' spans computed here in host memory
    (:func:`moetrain.models.varlen.with_spans`), so the forward on the GPU never waits to read them back. In pinned
    memory on a CUDA machine (the loaders' ``pin_memory``), the copy to the GPU does not wait for its queue either."""
    return with_spans(default_collate(rows))
