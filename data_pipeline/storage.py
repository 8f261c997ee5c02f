"""Where a source lives: a local directory or any fsspec URL (``s3://``, ``gs://``, ``https://``, ...).

A data config source (or validation source) may be a URL; the loader then reads ``index.json`` and
``stats.json`` whole and every member by byte range (the index's offsets), so a step fetches only the
members its samples touch. Local caching is fsspec's own: prefix the URL with ``simplecache::`` or
``filecache::`` (for example ``simplecache::s3://bucket/web``). ``s3fs``/``gcsfs`` (the ``remote`` extra)
provide the cloud filesystems and take credentials from the usual environment; nothing here logs them.
A missing object, a permission error or a failure that outlasts the retries is one ``DataError`` line
naming the URL.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from data_pipeline.errors import DataError

log = logging.getLogger(__name__)

RETRIES = 3  # attempts per remote read, with backoff: transient network errors, throttling
BACKOFF_S = 0.5


def is_remote(where: str | os.PathLike) -> bool:
    text = str(where)
    return "://" in text and not text.startswith("file://")


class Location:
    """A source directory: file names below it are read whole or by byte range, locally or through fsspec."""

    def __init__(self, where: str | os.PathLike):
        text = str(where)
        self.remote = is_remote(text)
        if self.remote:
            try:
                import fsspec
            except ImportError:
                raise DataError(f"{text}: remote sources need fsspec (pip install 'hybrid-megatron[remote]')") from None
            try:
                self.fs, self._root = fsspec.core.url_to_fs(text)
            except (ImportError, ValueError) as exc:  # an unknown protocol, or its package is missing
                raise DataError(f"{text}: cannot open this URL ({exc})") from None
            self.url = text.rstrip("/")
        else:
            self.path = Path(text.removeprefix("file://")).absolute()
            self.url = str(self.path)

    def __str__(self) -> str:
        return self.url

    def name_of(self, name: str) -> str:
        """How ``name`` below this location is shown in messages."""
        return f"{self.url}/{name}"

    def _remote_path(self, name: str) -> str:
        return f"{self._root.rstrip('/')}/{name}"

    def is_dir(self) -> bool:
        if not self.remote:
            return self.path.is_dir()
        return self._retry("list", "", lambda: self.fs.isdir(self._root))

    def exists(self, name: str) -> bool:
        if not self.remote:
            return (self.path / name).is_file()
        return self._retry("stat", name, lambda: self.fs.isfile(self._remote_path(name)))

    def contains(self, name: str) -> bool:
        """Whether ``name`` stays directly inside this directory (no ``..``, no separators)."""
        return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")

    def read_bytes(self, name: str) -> bytes:
        if not self.remote:
            return (self.path / name).read_bytes()
        return self._retry("read", name, lambda: self.fs.cat_file(self._remote_path(name)))

    def size(self, name: str) -> int:
        if not self.remote:
            return (self.path / name).stat().st_size
        return int(self._retry("stat", name, lambda: self.fs.info(self._remote_path(name))["size"]))

    def read_range(self, name: str, start: int, length: int) -> bytes:
        """``length`` bytes of ``name`` from ``start`` (remote only: local readers keep files open)."""
        return self._retry("read", name, lambda: self.fs.cat_file(self._remote_path(name), start=start,
                                                                   end=start + length))

    def _retry(self, what: str, name: str, call):
        where = self.name_of(name) if name else self.url
        for attempt in range(1, RETRIES + 1):
            try:
                return call()
            except FileNotFoundError:
                raise DataError(f"{where}: no such object") from None
            except PermissionError:
                raise DataError(f"{where}: permission denied (check the credentials in the environment)") from None
            except Exception as exc:  # noqa: BLE001  (network stacks raise their own types; retried, then one line)
                if attempt == RETRIES:
                    raise DataError(f"{where}: {what} failed after {RETRIES} attempts "
                                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
                log.warning("%s: %s failed (%s), retrying", where, what, type(exc).__name__)
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        raise AssertionError("unreachable")
