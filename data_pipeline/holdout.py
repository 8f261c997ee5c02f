"""Held-out validation documents: chosen by content, disjoint from training by construction, provable.

``prepare-data --holdout-fraction F --holdout-output DIR`` sends a document to the validation source when
the 64-bit BLAKE2b hash of its token ids falls below ``F * 2**64``. The choice depends on the document
alone (not on file order, worker count or position), so identical documents always land on the same side
and a re-run makes the same split. ``data audit --validation`` proves the split of a data config: it hashes
every document of its validation and training sources and reports any shared one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

from data_pipeline.errors import DataError

RULE = "blake2b-64 of the document's little-endian token ids (EOS excluded) < fraction * 2**64"


def document_hash(tokens: np.ndarray) -> int:
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(tokens).astype(tokens.dtype.newbyteorder("<"),
                                                                               copy=False).tobytes(),
                                          digest_size=8).digest(), "little")


def held_out(doc_tokens: np.ndarray, fraction: float) -> bool:
    return document_hash(doc_tokens) < int(fraction * 2**64)


def split_documents(tokens: np.ndarray, doc_ends: np.ndarray, fraction: float
                    ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) parts of one file's stream, each as (tokens with EOS after each doc, doc ends)."""
    parts: tuple[list, list] = ([], [])
    start = 0
    for end in doc_ends.tolist():
        doc = tokens[start:end]  # the document and its EOS
        parts[held_out(doc[:-1], fraction)].append(doc)
        start = end
    out = []
    for docs in parts:
        if docs:
            out.append((np.concatenate(docs), np.cumsum([d.size for d in docs]).astype(np.int64)))
        else:
            out.append((tokens[:0], np.empty(0, np.int64)))
    return out[0], out[1]


def iter_documents(tokens: np.ndarray, eos_id: int) -> Iterator[np.ndarray]:
    """The documents of a member's tokens (each without its EOS)."""
    ends = np.flatnonzero(tokens == eos_id)
    start = 0
    for end in ends.tolist():
        yield tokens[start:end]
        start = end + 1


def source_hashes(index) -> set[int]:
    """The document hashes of a source (``shards.SourceIndex``): every member read and split at EOS."""
    from data_pipeline.shards import MemberReader

    reader = MemberReader(index)
    try:
        return {document_hash(doc) for m in range(index.num_members)
                for doc in iter_documents(reader.read(m), index.eos_id)}
    finally:
        reader.close()


def check_disjoint(training: dict, validation: dict) -> dict:
    """Per validation source, its document count and the documents it shares with training (must be 0).
    DataError naming the first pair of sources that share a document."""
    train_hashes = {name: source_hashes(ix) for name, ix in sorted(training.items())}
    report = {}
    for name, ix in sorted(validation.items()):
        hashes = source_hashes(ix)
        shared = {t: len(hashes & th) for t, th in train_hashes.items()}
        report[name] = {"documents": len(hashes), "shared_with_training": shared}
        overlap = next(((t, n) for t, n in shared.items() if n), None)
        if overlap:
            raise DataError(f"validation source {name} shares {overlap[1]} of its {len(hashes)} documents with "
                            f"training source {overlap[0]}: it is not held out")
    return report
