"""Turning one input file into token arrays, and packing documents into members (shared by ``prepare.py``
and ``distributed.py``).

``tokenize_file`` reads a file's documents and appends EOS after each (refusing a document that tokenises to
EOS inside its text); ``Packer`` cuts the stream into members of whole documents, closing each at the first
document boundary at or past the target size.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.shards import ShardWriter

ENCODE_BATCH = 256  # documents per tokenizer call


def tokenize_file(path: str, text_field: str, tok, progress=None) -> tuple[str, np.ndarray, np.ndarray, int, int]:
    """Tokenise one file: (path, tokens with EOS after each doc, doc end offsets, text bytes, empty docs)."""
    from data_pipeline.readers import iter_documents

    pieces: list[np.ndarray] = []
    text_bytes = empty = 0
    batch: list[str] = []
    eos = np.asarray([tok.eos_id], dtype=tok.dtype)
    for text in iter_documents(path, text_field, progress=progress):
        if not text:
            empty += 1
            continue
        text_bytes += len(text.encode("utf-8"))
        batch.append(text)
        if len(batch) >= ENCODE_BATCH:
            _check_and_append(path, tok.encode_batch(batch), pieces, eos, tok.eos_id)
            batch.clear()
    if batch:
        _check_and_append(path, tok.encode_batch(batch), pieces, eos, tok.eos_id)
    tokens = np.concatenate(pieces) if pieces else np.empty(0, tok.dtype)
    lengths = np.fromiter((p.size for p in pieces), np.int64, len(pieces))
    doc_ends = np.cumsum(lengths)[1::2]
    return path, tokens, doc_ends, text_bytes, empty


def _check_and_append(path, encoded, pieces, eos, eos_id) -> None:
    for ids in encoded:
        if (ids == eos_id).any():
            raise DataError(f"{path}: document {len(pieces) // 2} tokenises to EOS inside its text")
        pieces.append(ids)
        pieces.append(eos)


class Packer:
    """Greedy packing of whole documents into members of at least ``target`` tokens."""

    def __init__(self, writer: ShardWriter, target: int):
        self.writer, self.target = writer, target
        self.buf: list[np.ndarray] = []
        self.buf_tokens = self.buf_docs = 0

    def add_file(self, tokens: np.ndarray, doc_ends: np.ndarray) -> None:
        start = 0  # token offset in this file not yet buffered
        first_doc = 0
        while first_doc < doc_ends.size:
            need = self.target - self.buf_tokens
            # first document end that brings the buffer to the target
            j = int(np.searchsorted(doc_ends, start + need, side="left"))
            if j >= doc_ends.size:
                self.buf.append(tokens[start:])
                self.buf_tokens += tokens.size - start
                self.buf_docs += doc_ends.size - first_doc
                return
            end = int(doc_ends[j])
            self.buf.append(tokens[start:end])
            self.buf_tokens += end - start
            self.buf_docs += j + 1 - first_doc
            self.flush()
            start, first_doc = end, j + 1

    def flush(self) -> None:
        if self.buf_tokens:
            self.writer.add(np.concatenate(self.buf), self.buf_docs)
        self.buf, self.buf_tokens, self.buf_docs = [], 0, 0
