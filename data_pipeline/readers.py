"""Documents out of corpus files: ``.txt`` (one document per file), ``.jsonl`` (one per line, field
``text`` unless told otherwise), ``.parquet`` (one per row of the text column), each plain or ``.gz``/
``.zst`` compressed (parquet: plain only, it compresses internally). Empty documents are skipped and
counted; anything unreadable stops with a DataError naming the file (and line or row group).
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from data_pipeline.errors import ConfigError, DataError

KINDS = (".txt", ".jsonl", ".parquet")
COMPRESSIONS = (".gz", ".zst")


def file_kind(path: str | Path) -> tuple[str, str | None]:
    """(kind, compression) from the file name, e.g. ``a.jsonl.zst`` -> (``.jsonl``, ``.zst``)."""
    suffixes = Path(path).suffixes
    comp = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS else None
    kind_suffixes = suffixes[:-1] if comp else suffixes
    kind = kind_suffixes[-1] if kind_suffixes else ""
    if kind not in KINDS or (kind == ".parquet" and comp):
        raise ConfigError(f"{path}: unsupported input (expected .txt, .jsonl or .parquet, optionally .gz/.zst; "
                          "parquet uncompressed)")
    return kind, comp


class TruncatedError(EOFError):
    """The compressed input ended inside a frame."""


class _Counting(io.RawIOBase):
    """The raw file, reporting bytes read through ``progress(n)`` (the bar advances inside one large file)."""

    def __init__(self, path: Path, progress: Callable[[int], None] | None):
        self._f = open(path, "rb")  # noqa: SIM115 (closed with this object)
        self._progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._f.readinto(buffer)
        if n and self._progress is not None:
            self._progress(n)
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


class _ZstdFrames(io.RawIOBase):
    """Decompresses consecutive zstd frames; input that ends inside a frame raises ``TruncatedError``
    (zstandard's stream reader returns end-of-file there, which silently cut the last document)."""

    def __init__(self, raw: io.RawIOBase):
        import zstandard

        self._raw, self._zstd = raw, zstandard
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._out = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise TruncatedError("the zstd stream ends inside a frame")
                return 0
            while chunk:
                self._in_frame = True
                self._out += self._dobj.decompress(chunk)
                chunk = b""
                if self._dobj.eof:  # a frame ended: the rest starts the next one
                    chunk, self._in_frame = self._dobj.unused_data, False
                    self._dobj = self._zstd.ZstdDecompressor().decompressobj()
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_text(path: Path, comp: str | None, progress: Callable[[int], None] | None = None) -> io.TextIOBase:
    raw = _Counting(path, progress)
    if comp == ".gz":
        stream = gzip.GzipFile(fileobj=io.BufferedReader(raw), mode="rb")
        stream.close = _closing(stream.close, raw)  # GzipFile leaves a passed fileobj open
    elif comp == ".zst":
        stream = io.BufferedReader(_ZstdFrames(raw))
    else:
        stream = io.BufferedReader(raw)
    return io.TextIOWrapper(stream, encoding="utf-8", newline="")


def _closing(close: Callable[[], None], raw: io.RawIOBase) -> Callable[[], None]:
    def both() -> None:
        close()
        raw.close()

    return both


def iter_documents(path: str | Path, text_field: str = "text",
                   progress: Callable[[int], None] | None = None) -> Iterator[str]:
    """Yield the documents of one input file, in file order; ``progress(n)`` hears of every n bytes read."""
    path = Path(path)
    kind, comp = file_kind(path)
    try:
        if kind == ".parquet":
            yield from _iter_parquet(path, text_field)
            if progress is not None:
                progress(path.stat().st_size)
            return
        with _open_text(path, comp, progress) as f:
            if kind == ".txt":
                yield f.read()
                return
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: no string field {text_field!r}")
                yield text
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start} of a block)") from None
    except (OSError, EOFError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise DataError(f"{path}: no such file") from None
        if isinstance(exc, EOFError):  # gzip's "ended before the end-of-stream marker", our TruncatedError
            raise DataError(f"{path}: truncated: the compressed stream ends early ({exc})") from None
        raise DataError(f"{path}: unreadable ({exc})") from None
    except Exception as exc:  # zstandard raises its own error type while streaming
        if type(exc).__name__ == "ZstdError":
            raise DataError(f"{path}: corrupt zstd stream ({exc})") from None
        raise


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{path}: unreadable parquet ({exc})") from None
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    for rg in range(pf.num_row_groups):
        column = pf.read_row_group(rg, columns=[text_field]).column(0)
        for value in column.to_pylist():
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"{path}: row group {rg}: column {text_field!r} is not text")
            yield value
