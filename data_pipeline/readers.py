"""Documents out of corpus files: ``.txt`` (one document per file), ``.jsonl`` (one per line, field
``text`` unless told otherwise), ``.parquet`` (one per row of the text column), each plain or ``.gz``/
``.zst`` compressed (parquet: plain only, it compresses internally). Empty documents are skipped and
counted; anything unreadable stops with a DataError naming the file (and line or row group).
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
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


def _open_text(path: Path, comp: str | None) -> io.TextIOBase:
    if comp == ".gz":
        raw = gzip.open(path, "rb")
    elif comp == ".zst":
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)  # noqa: SIM115
    else:
        raw = open(path, "rb")  # noqa: SIM115
    return io.TextIOWrapper(io.BufferedReader(raw) if comp == ".zst" else raw, encoding="utf-8", newline="")


def iter_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one input file, in file order."""
    path = Path(path)
    kind, comp = file_kind(path)
    try:
        if kind == ".parquet":
            yield from _iter_parquet(path, text_field)
            return
        with _open_text(path, comp) as f:
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
