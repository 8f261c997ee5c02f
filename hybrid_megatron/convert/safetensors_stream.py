"""Sharded safetensors written one tensor at a time.

Every name, shape and dtype is known before the first byte is read (from the checkpoint metadata), so
each shard's header can be written first and the tensors streamed after it: peak memory is one tensor
group, not one shard. The layout is the safetensors format: an 8-byte little-endian header length, a
JSON header (``dtype``, ``shape``, ``data_offsets`` per tensor, ``__metadata__``) padded with spaces to
8 bytes, then the raw little-endian data in header order.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_DTYPES = {"torch.bfloat16": ("BF16", 2), "torch.float32": ("F32", 4), "torch.float16": ("F16", 2)}
INDEX_NAME = "model.safetensors.index.json"


def dtype_code(dtype: torch.dtype) -> tuple[str, int]:
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"no safetensors writer for dtype {dtype}") from None


@dataclass(slots=True)
class Shard:
    file_name: str
    entries: list[tuple[str, tuple[int, ...], torch.dtype]] = field(default_factory=list)
    num_bytes: int = 0


def plan_shards(
    entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int
) -> list[Shard]:
    """Assigns tensors, in order, to shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[Shard] = []
    current = Shard("")
    for name, shape, dtype in entries:
        nbytes = _numel(shape) * dtype_code(dtype)[1]
        if current.entries and current.num_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current = Shard("")
        current.entries.append((name, shape, dtype))
        current.num_bytes += nbytes
    if current.entries:
        shards.append(current)
    for i, shard in enumerate(shards):
        shard.file_name = (
            "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class ShardWriter:
    """Writes one planned shard: header on open, then ``write(name, tensor)`` in plan order."""

    def __init__(self, path: Path, shard: Shard):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in shard.entries:
            code, size = dtype_code(dtype)
            end = offset + _numel(shape) * size
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._expected = list(shard.entries)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        want_name, shape, dtype = self._expected.pop(0)
        if name != want_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise AssertionError(f"shard plan says {want_name} {shape} {dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        raw = tensor.detach().contiguous().view(-1).view(torch.uint8)  # little-endian host bytes
        self._file.write(memoryview(raw.numpy()))

    def close(self) -> None:
        if self._expected:
            raise AssertionError(f"shard closed with {len(self._expected)} tensors unwritten")
        self._file.close()


def write_index(out_dir: Path, shards: list[Shard]) -> None:
    weight_map = {name: shard.file_name for shard in shards for name, _, _ in shard.entries}
    total = sum(shard.num_bytes for shard in shards)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
