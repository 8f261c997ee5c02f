"""On-disk format of one source: webdataset tar shards of zstd token members, an index and stats.

A source directory written by ``prepare-data`` holds::

    shard-000000.tar ...   plain tar files (``tar -t`` lists them, ``webdataset.WebDataset`` reads them);
                           member ``<8-digit id>.tokens.zst`` = zstd frame (with checksum) of a
                           little-endian token array holding whole documents, each followed by EOS
    index.json             dtype, EOS id, shard sizes and, per member, shard/offset/size/tokens/docs,
                           so a reader seeks straight to any member without scanning a tar
    stats.json             source, documents, tokens, tokenizer, vocab size (see ``prepare.py``)

A source may carry a loss-mask channel (synthetic tasks such as MQAR train on answer tokens only): each
member is then followed in the same tar sample by ``<id>.mask.zst``, a zstd frame of one uint8 per token
(1: the token is a training target), and ``index.json`` says ``"masks": true`` and records the mask's
offset and size per member. Sources without it train on every token.

Document boundaries are the EOS tokens: the tokenizers never emit EOS inside a document (``prepare``
checks it), so a reader finds every boundary without a separate table.

``index.json`` is written last: a directory without it is an interrupted ``prepare-data``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from data_pipeline.errors import DataError
from data_pipeline.storage import Location

log = logging.getLogger(__name__)

FORMAT = "hybrid-megatron-tokens/1"
MEMBER_EXT = "tokens.zst"
MASK_EXT = "mask.zst"
INDEX_NAME = "index.json"
STATS_NAME = "stats.json"
_BLOCK = 512  # tar block size


def shard_name(i: int, prefix: str = "shard-") -> str:
    return f"{prefix}{i:06d}.tar"


class ShardWriter:
    """Appends compressed members to numbered tar shards through ``webdataset.TarWriter``.

    Members are written with a fixed mtime/owner so that the same inputs give the same bytes.
    """

    def __init__(self, out_dir: Path, shard_bytes: int, vocab_size: int, zstd_level: int = 3,
                 prefix: str = "shard-", masks: bool = False):
        """``prefix``: shard file names are ``<prefix><6-digit number>.tar``; ``masks``: every member comes
        with its loss mask."""
        self.out_dir = out_dir
        self.prefix = prefix
        self.shard_bytes = shard_bytes
        self.vocab_size = vocab_size
        self._compressor = zstandard.ZstdCompressor(level=zstd_level, write_checksum=True)
        self._writer = None
        self._shard = -1
        self.shards: list[dict] = []
        self.members: dict[str, list] = {k: [] for k in ("shard", "name", "offset", "size", "tokens", "docs")}
        self.masks = masks
        if masks:
            self.members.update(mask_offset=[], mask_size=[])

    def _open_next(self) -> None:
        import webdataset as wds

        self._close_current()
        self._shard += 1
        self._path = self.out_dir / shard_name(self._shard, self.prefix)
        self._writer = wds.TarWriter(str(self._path), encoder=False, mtime=0, user="data", group="data",
                                     mode=0o444)

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self.shards.append({"name": self._path.name, "bytes": self._path.stat().st_size})
            self._writer = None

    def add(self, tokens: np.ndarray, num_docs: int, mask: np.ndarray | None = None) -> None:
        """Compress ``tokens`` (whole documents, EOS-terminated) into the next member, with its loss mask
        (one 0/1 per token) when the writer was made with ``masks``."""
        where = f"member {len(self.members['name']):08d} being written"
        check_token_range(tokens, self.vocab_size, where)
        if self.masks != (mask is not None):
            raise ValueError(f"{where}: a mask {'is required' if self.masks else 'was given to a writer without masks'}")
        if mask is not None:
            check_mask(mask, tokens.size, where)
        payload = self._compressor.compress(np.ascontiguousarray(tokens).astype(tokens.dtype.newbyteorder("<"),
                                                                                 copy=False).tobytes())
        if self._writer is None or self._writer.tarstream.offset >= self.shard_bytes:
            self._open_next()
        key = f"{len(self.members['name']):08d}"
        offset = self._write(key, MEMBER_EXT, payload)
        for k, v in (("shard", self._shard), ("name", f"{key}.{MEMBER_EXT}"), ("offset", offset),
                     ("size", len(payload)), ("tokens", int(tokens.size)), ("docs", num_docs)):
            self.members[k].append(v)
        if mask is not None:  # same key, same shard: one webdataset sample with both files
            mask_payload = self._compressor.compress(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
            self.members["mask_offset"].append(self._write(key, MASK_EXT, mask_payload))
            self.members["mask_size"].append(len(mask_payload))

    def _write(self, key: str, ext: str, payload: bytes) -> int:
        """Appends one file; returns the offset of its data (which ends at the stream offset, padded to a
        whole block)."""
        self._writer.write({"__key__": key, ext: payload})
        return self._writer.tarstream.offset - -(-len(payload) // _BLOCK) * _BLOCK

    def finish(self, dtype: np.dtype, eos_id: int) -> dict:
        """Close the last shard and return the index mapping (the caller writes it)."""
        self._close_current()
        return {"format": FORMAT, "dtype": np.dtype(dtype).newbyteorder("<").str, "eos_id": eos_id,
                "shards": self.shards, "members": self.members, **({"masks": True} if self.masks else {})}


def check_token_range(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    """DataError when an id falls outside [0, vocab_size): a max over the member, cheap beside zstd."""
    if tokens.size == 0:
        return
    high, low = int(tokens.max()), int(tokens.min())
    if high >= vocab_size or low < 0:
        bad = high if high >= vocab_size else low
        raise DataError(f"{where}: token id {bad} outside the source's vocabulary of {vocab_size}")


def check_mask(mask: np.ndarray, size: int, where: str) -> None:
    if mask.shape != (size,):
        raise DataError(f"{where}: loss mask of shape {mask.shape} for {size} tokens")
    if mask.size and int(np.max(mask)) > 1:
        raise DataError(f"{where}: loss mask holds {int(np.max(mask))} (only 0 and 1 are allowed)")


def written_files(out_dir: Path) -> list[Path]:
    """The files ``prepare-data`` writes into a source directory (what an interrupted run leaves)."""
    return [f for f in out_dir.iterdir()
            if f.name in (INDEX_NAME, STATS_NAME) or (f.name.startswith(("shard-", "part-")) and f.suffix == ".tar")]


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


@dataclass
class SourceIndex:
    """The index of one source directory, validated against the shard files on disk."""

    location: Location
    shard_names: list[str]
    dtype: np.dtype
    eos_id: int
    member_shard: np.ndarray
    member_name: list[str]
    member_offset: np.ndarray
    member_size: np.ndarray
    member_tokens: np.ndarray
    stats: dict
    fingerprint: str
    vocab_size: int
    member_mask_offset: np.ndarray | None = None  # with a loss-mask channel
    member_mask_size: np.ndarray | None = None

    @property
    def has_masks(self) -> bool:
        return self.member_mask_offset is not None

    @property
    def root(self) -> str:
        """The source directory or URL (what the loader's worker processes reopen)."""
        return str(self.location)

    @property
    def shard_paths(self) -> list[str]:
        """Shard files as paths (local) or URLs, for display and for readers such as ``tar`` or webdataset."""
        return [self.location.name_of(n) for n in self.shard_names]

    @property
    def num_members(self) -> int:
        return len(self.member_name)

    @property
    def num_tokens(self) -> int:
        return int(self.member_tokens.sum())

    @property
    def remote(self) -> bool:
        return self.location.remote

    @classmethod
    def open(cls, root: str | os.PathLike, label: str = "") -> SourceIndex:
        """Read ``index.json``/``stats.json`` and check every shard exists with the recorded size (a local
        directory or an fsspec URL: ``storage.Location``)."""
        location = Location(root)
        what = f"source {label} ({location})" if label else f"source {location}"
        if not location.is_dir():
            raise DataError(f"{what}: directory does not exist")
        index_path = location.name_of(INDEX_NAME)
        if not location.exists(INDEX_NAME):
            raise DataError(f"{what}: no {INDEX_NAME} (not a prepare-data output, or it was interrupted)")
        raw = location.read_bytes(INDEX_NAME)
        try:
            index = json.loads(raw)
            stats = json.loads(location.read_bytes(STATS_NAME))
        except (OSError, ValueError) as exc:
            raise DataError(f"{what}: unreadable {INDEX_NAME}/{STATS_NAME}: {exc}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            found = index.get("format") if isinstance(index, dict) else type(index).__name__
            raise DataError(f"{what}: {INDEX_NAME} has format {found!r}, expected {FORMAT!r}")
        _require(index, {"dtype": str, "eos_id": int, "shards": list, "members": dict}, f"{index_path}")
        _require(index["members"], {k: list for k in ("shard", "name", "offset", "size", "tokens")},
                 f"{index_path}: members")
        if not isinstance(stats, dict) or not isinstance(stats.get("vocab_size"), int) or stats["vocab_size"] < 1:
            raise DataError(f"{location.name_of(STATS_NAME)}: no positive integer 'vocab_size'")
        shard_names = []
        for shard in index["shards"]:
            _require(shard, {"name": str, "bytes": int}, f"{index_path}: a shard entry")
            name = shard["name"]
            if not location.contains(name):  # a name like ../../etc/passwd or a sub-path
                raise DataError(f"{index_path}: shard name {name!r} points outside {location}")
            if not location.exists(name):
                raise DataError(f"{location.name_of(name)}: shard listed in {INDEX_NAME} is missing")
            size = location.size(name)
            if size != shard["bytes"]:
                raise DataError(f"{location.name_of(name)}: shard is {size} bytes, index says {shard['bytes']} "
                                "(truncated or rewritten)")
            shard_names.append(name)
        m = index["members"]
        if not m["name"]:
            raise DataError(f"{what}: has no members (empty corpus)")
        masks = {}
        if index.get("masks"):
            _require(m, {"mask_offset": list, "mask_size": list}, f"{index_path}: members (a source with masks)")
            if not len(m["mask_offset"]) == len(m["mask_size"]) == len(m["name"]):
                raise DataError(f"{index_path}: {len(m['mask_offset'])} mask entries for {len(m['name'])} members")
            masks = {"member_mask_offset": np.asarray(m["mask_offset"], np.int64),
                     "member_mask_size": np.asarray(m["mask_size"], np.int64)}
        return cls(location=location, shard_names=shard_names, dtype=np.dtype(index["dtype"]),
                   eos_id=int(index["eos_id"]), member_shard=np.asarray(m["shard"], np.int64),
                   member_name=list(m["name"]), member_offset=np.asarray(m["offset"], np.int64),
                   member_size=np.asarray(m["size"], np.int64), member_tokens=np.asarray(m["tokens"], np.int64),
                   stats=stats, fingerprint=hashlib.sha256(raw).hexdigest()[:16], vocab_size=int(stats["vocab_size"]),
                   **masks)


def _require(obj, fields: dict[str, type], where: str) -> None:
    """DataError naming the first missing or mistyped field of an index record."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object, got {type(obj).__name__}")
    for name, kind in fields.items():
        if not isinstance(obj.get(name), kind):
            raise DataError(f"{where}: no {kind.__name__} field {name!r} (a damaged or hand-edited index)")


class MemberReader:
    """Reads and decompresses single members by index entry; keeps shard files open."""

    def __init__(self, index: SourceIndex):
        self.index = index
        self._files: dict[int, object] = {}
        self._dctx = zstandard.ZstdDecompressor()

    def _file(self, shard: int):
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.index.shard_paths[shard], "rb")  # noqa: SIM115 (kept open)
        return f

    def _blob(self, shard: int, offset: int, size: int) -> bytes:
        if self.index.remote:  # one ranged GET per member: only the bytes this step needs
            return self.index.location.read_range(self.index.shard_names[shard], offset, size)
        f = self._file(shard)
        f.seek(offset)
        return f.read(size)

    def _decompress(self, shard: int, offset: int, size: int, expected: int, where: str) -> bytes:
        blob = self._blob(shard, offset, size)
        if len(blob) != size:
            raise DataError(f"{where}: truncated ({len(blob)} of {size} bytes)")
        try:
            data = self._dctx.decompress(blob, max_output_size=expected)
        except zstandard.ZstdError as exc:
            raise DataError(f"{where}: corrupt zstd data ({exc})") from None
        if len(data) != expected:
            raise DataError(f"{where}: decompressed to {len(data)} bytes, index says {expected}")
        return data

    def read(self, member: int) -> np.ndarray:
        """Return the token array of ``member``; DataError naming shard and member on any damage."""
        ix = self.index
        shard = int(ix.member_shard[member])
        where = f"{ix.shard_paths[shard]}: member {ix.member_name[member]}"
        data = self._decompress(shard, int(ix.member_offset[member]), int(ix.member_size[member]),
                                int(ix.member_tokens[member]) * ix.dtype.itemsize, where)
        tokens = np.frombuffer(data, dtype=ix.dtype)
        check_token_range(tokens, ix.vocab_size, where)
        return tokens

    def read_mask(self, member: int) -> np.ndarray:
        """The loss mask of ``member`` (uint8, one per token) of a source with masks."""
        ix = self.index
        shard = int(ix.member_shard[member])
        where = f"{ix.shard_paths[shard]}: mask of member {ix.member_name[member]}"
        tokens = int(ix.member_tokens[member])
        data = self._decompress(shard, int(ix.member_mask_offset[member]), int(ix.member_mask_size[member]), tokens,
                                where)
        mask = np.frombuffer(data, dtype=np.uint8)
        check_mask(mask, tokens, where)
        return mask

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
