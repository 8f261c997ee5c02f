"""Tokenizers for ``prepare-data``: the built-in byte-level one and local Hugging Face directories.

Every tokenizer turns one document into token ids *without* EOS; ``prepare`` appends EOS after each
document. EOS never appears inside a document: bytes cannot produce it, and HF tokenizers are run with
``encode_special_tokens`` so that a literal ``</s>`` in the text is encoded as plain text (``prepare``
still checks and refuses a document that contains EOS).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from data_pipeline.errors import ConfigError

BYTES_EOS = 256


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, EOS = 256, vocab 257."""

    name = "bytes"
    eos_id = BYTES_EOS
    vocab_size = 257
    dtype = np.dtype("<u2")

    def describe(self) -> dict:
        return {"kind": "bytes", "fingerprint": "bytes-v1", "eos_id": self.eos_id, "vocab_size": self.vocab_size}

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(self.dtype) for t in texts]

    def decode(self, ids) -> str:
        """Text of ``ids``: bytes decoded as UTF-8 (broken sequences replaced), EOS dropped."""
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face tokenizer directory, loaded with ``transformers.AutoTokenizer``."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        p = Path(path)
        if not p.is_dir():
            raise ConfigError(f"--tokenizer {path}: not 'bytes' and not a tokenizer directory")
        try:
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--tokenizer {path}: cannot load a Hugging Face tokenizer ({exc})") from None
        if tok.eos_token_id is None:
            raise ConfigError(f"--tokenizer {path}: tokenizer defines no eos_token")
        if not getattr(tok, "is_fast", False):
            raise ConfigError(f"--tokenizer {path}: needs a fast tokenizer (tokenizer.json)")
        self.path = str(p.resolve())
        self.eos_id = int(tok.eos_token_id)
        self.vocab_size = len(tok)
        self.dtype = np.dtype("<u2") if self.vocab_size <= 65535 else np.dtype("<u4")
        self._backend = tok.backend_tokenizer
        self._backend.encode_special_tokens = True  # a literal special token in the text stays text
        digest = hashlib.sha256()
        for f in sorted(p.iterdir()):
            if f.is_file():
                digest.update(f.name.encode() + b"\0" + f.read_bytes())
        self._fingerprint = digest.hexdigest()[:16]

    def describe(self) -> dict:
        return {"kind": "hf", "path": self.path, "fingerprint": self._fingerprint, "eos_id": self.eos_id,
                "vocab_size": self.vocab_size}

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encs = self._backend.encode_batch_fast(texts, add_special_tokens=False) if hasattr(
            self._backend, "encode_batch_fast") else self._backend.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self.dtype) for e in encs]

    def decode(self, ids) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """``bytes`` or a local HF tokenizer directory (no downloads)."""
    if spec == "bytes":
        return ByteTokenizer()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we parallelise over files ourselves
    return HFTokenizer(spec)
