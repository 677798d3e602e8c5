"""JSONL records to token ids and loss masks, for every data format a recipe can name.

Formats (``data.format``; ``auto`` picks one from the first record's keys):

* ``text``: ``{"text": "..."}``; every token is trained.
* ``instruction``: ``{"prompt": "...", "completion": "..."}``; the two strings are joined as they are
  (put the separator you want at the end of the prompt) and only the completion's tokens are trained.
* ``chat``: ``{"messages": [{"role": "user", "content": "..."}, ...]}`` rendered with the tokenizer's
  chat template (:mod:`moetrain.training.chat`); only the assistant messages' tokens are trained.
* ``pretokenized``: ``{"input_ids": [...]}`` with optional ``"labels"`` (-100 = not trained, otherwise
  equal to the input id) or ``"loss_mask"`` (0/1 per token); ids must be below the tokenizer's vocabulary.

A token of a string format is trained when its first character lies in a trained span, so the ids are
exactly those of tokenizing the whole rendered string.

A malformed record stops with the file and line (``on_error: raise``) or is skipped and counted
(``on_error: skip``); :class:`DataReport` holds the counts, which the data module prints.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from moetrain.training.chat import ChatError, ChatTemplate
from moetrain.training.tokenizer import TextTokenizer

FORMATS = ("auto", "text", "instruction", "chat", "pretokenized")
IGNORE_LABEL = -100
SKIP_HINT = " (or set data.on_error: skip)"
"""The end of a malformed-line error under ``on_error: raise``; a skip report leaves it out."""

Document = tuple[list[int], list[bool]]
"""Token ids and a same-length loss mask (True = the token is a training target)."""


class DataError(ValueError):
    """A data file is missing or a record is malformed; the message names the file and line."""


@dataclass
class DataReport:
    """What reading one data file did.

    Attributes:
        path: the file.
        format: the format used (after ``auto`` detection).
        documents: records turned into documents.
        skipped: (line, reason) of each record skipped under ``on_error: skip``.
        truncated: documents cut to ``seq_len`` tokens.
        untrained: truncated documents dropped because the cut removed every trained token.
        tokens: tokens of the kept documents (after truncation, EOS included).
        trained_tokens: of those, tokens that are training targets.
        rows: sequences produced (packed or padded rows).
    """

    path: str
    format: str = "text"
    documents: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)
    truncated: int = 0
    untrained: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    rows: int = 0

    def summary(self) -> str:
        """One line for the user, e.g. ``train.jsonl: 1500 chat documents, 2 skipped (lines 3, 9), ...``."""
        parts = [f"{self.path}: {self.documents} {self.format} documents"]
        if self.skipped:
            lines = ", ".join(str(line) for line, _ in self.skipped[:10]) + (", ..." if len(self.skipped) > 10 else "")
            parts.append(f"{len(self.skipped)} malformed lines skipped (lines {lines}; first: {self.skipped[0][1]})")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to seq_len")
        if self.untrained:
            parts.append(f"{self.untrained} of those dropped (no trained token left)")
        parts.append(f"{self.tokens} tokens ({self.trained_tokens} trained) in {self.rows} rows")
        return ", ".join(parts)


def iter_lines(path: str | Path) -> Iterator[tuple[int, Union[dict, DataError]]]:
    """Yield ``(line number, record or the DataError describing why the line is not one)`` for non-blank lines.

    Raises:
        DataError: the file does not exist.
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
                # json's messages may end in "at" ("Invalid control character at"): the column completes them
                problem = err.msg.removesuffix(" at")
                yield lineno, DataError(f"{path}, line {lineno}: not valid JSON ({problem} at column {err.colno}); "
                                        "each line must be one JSON object such as {\"text\": \"...\"}; fix or "
                                        f"remove that line{SKIP_HINT}")
                continue
            if not isinstance(record, dict):
                yield lineno, DataError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}; "
                                        "each line must look like {\"text\": \"...\"}")
                continue
            yield lineno, record


def detect_format(record: dict, text_field: str = "text") -> Optional[str]:
    """The format a record's keys name, or None."""
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "instruction"
    if "input_ids" in record:
        return "pretokenized"
    if text_field in record:
        return "text"
    return None


class RecordEncoder:
    """Turns one JSON record of a known format into a string with trained spans, or ids and a mask."""

    def __init__(self, fmt: str, tokenizer: TextTokenizer, text_field: str = "text",
                 chat: Optional[ChatTemplate] = None) -> None:
        self.format = fmt
        self.tokenizer = tokenizer
        self.text_field = text_field
        self.chat = chat

    def _string(self, record: dict, key: str) -> str:
        value = record.get(key)
        if not isinstance(value, str):
            found = "missing" if key not in record else f"a {type(value).__name__}"
            raise ValueError(f"field {key!r} is {found}; every {self.format} record needs a string {key!r} field "
                             f"(keys found: {', '.join(sorted(record)) or 'none'})")
        return value

    def spans(self, record: dict) -> tuple[str, Optional[list[tuple[int, int]]]]:
        """(text, trained character spans); spans None means every token is trained."""
        if self.format == "text":
            return self._string(record, self.text_field), None
        if self.format == "instruction":
            prompt, completion = self._string(record, "prompt"), self._string(record, "completion")
            if not completion:
                raise ValueError("field 'completion' is empty, so nothing would be trained")
            return prompt + completion, [(len(prompt), len(prompt) + len(completion))]
        assert self.format == "chat" and self.chat is not None
        try:
            return self.chat.render_with_spans(record.get("messages"))
        except ChatError as err:
            raise ValueError(str(err)) from None

    def pretokenized(self, record: dict) -> Document:
        ids = record.get("input_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("field 'input_ids' must be a non-empty list of integers")
        vocab = self.tokenizer.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the tokenizer's vocabulary of {vocab} ids "
                             f"(0..{vocab - 1}); the data was tokenized with a different tokenizer than data.tokenizer")
        if "labels" in record:
            labels = record["labels"]
            if not isinstance(labels, list) or len(labels) != len(ids):
                raise ValueError(f"field 'labels' must be a list as long as 'input_ids' ({len(ids)})")
            if any(lab != IGNORE_LABEL and lab != t for lab, t in zip(labels, ids, strict=True)):
                raise ValueError(f"'labels' must equal 'input_ids' or be {IGNORE_LABEL} (the model shifts them itself)")
            return ids, [lab != IGNORE_LABEL for lab in labels]
        if "loss_mask" in record:
            mask = record["loss_mask"]
            if not isinstance(mask, list) or len(mask) != len(ids) or any(m not in (0, 1) for m in mask):
                raise ValueError(f"field 'loss_mask' must be a list of 0/1 as long as 'input_ids' ({len(ids)})")
            return ids, [bool(m) for m in mask]
        return ids, [True] * len(ids)


def _masks(tokenizer: TextTokenizer, texts: list[str], spans: list[Optional[list[tuple[int, int]]]]) -> list[Document]:
    encodings = tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False)
    docs = []
    for enc, trained in zip(encodings, spans, strict=True):
        if trained is None:
            docs.append((enc.ids, [True] * len(enc.ids)))
        else:
            docs.append((enc.ids, [any(s <= start < e for s, e in trained) for start, _ in enc.offsets]))
    return docs


def encode_file(
    path: str | Path,
    tokenizer: TextTokenizer,
    fmt: str = "auto",
    *,
    text_field: str = "text",
    chat: Optional[ChatTemplate] = None,
    on_error: str = "raise",
    report: Optional[DataReport] = None,
) -> list[Document]:
    """Every record of a JSONL file as token ids and a loss mask (no EOS: the packer adds it).

    Args:
        path: the JSONL file.
        tokenizer: the tokenizer (also the vocabulary that pretokenized ids must fit).
        fmt: one of :data:`FORMATS`.
        text_field: the text key of the ``text`` format.
        chat: the template for ``chat`` records (default: the tokenizer directory's).
        on_error: ``raise`` stops at the first malformed record; ``skip`` skips and counts it in ``report``.
        report: filled with the counts when given.

    Raises:
        DataError: a malformed record (``on_error: raise``), an unknown format, or no document at all.
    """
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r}: choose one of {', '.join(FORMATS)}")
    if on_error not in ("raise", "skip"):
        raise DataError(f"data.on_error={on_error!r}: choose raise or skip")
    report = report if report is not None else DataReport(str(path))
    encoder: Optional[RecordEncoder] = None
    texts: list[str] = []
    spans: list[Optional[list[tuple[int, int]]]] = []
    docs: list[Document] = []

    def bad(lineno: int, error: DataError) -> None:
        if on_error == "raise":
            raise error
        reason = str(error).removesuffix(SKIP_HINT)  # the skip report must not advise what is already set
        report.skipped.append((lineno, reason.split(": ", 1)[1] if ": " in reason else reason))

    for lineno, record in iter_lines(path):
        if isinstance(record, DataError):
            bad(lineno, record)
            continue
        if encoder is None:
            chosen = detect_format(record, text_field) if fmt == "auto" else fmt
            if chosen is None:
                bad(lineno, DataError(f"{path}, line {lineno}: cannot tell the data format from the keys "
                                      f"({', '.join(sorted(record)) or 'none'}); use 'text', 'prompt'+'completion', "
                                      "'messages' or 'input_ids', or set data.format"))
                continue
            if chosen == "chat" and chat is None:
                chat = ChatTemplate.from_tokenizer_dir(tokenizer.path)
            encoder = RecordEncoder(chosen, tokenizer, text_field, chat)
            report.format = chosen
        try:
            if encoder.format == "pretokenized":
                docs.append(encoder.pretokenized(record))
            else:
                text, trained = encoder.spans(record)
                texts.append(text)
                spans.append(trained)
        except ValueError as err:
            bad(lineno, DataError(f"{path}, line {lineno}: {err}"))
    if texts:
        docs = _masks(tokenizer, texts, spans)
    if not docs:
        why = f" (all {len(report.skipped)} non-blank lines were malformed and skipped)" if report.skipped else ""
        raise DataError(f"{path}: no documents{why}; the file is empty. Put one JSON object per line in it")
    report.documents = len(docs)
    return docs

