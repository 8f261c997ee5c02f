"""Per-source token streams: epochs of members in a seeded permutation, read by token position.

A source's stream is the endless concatenation of its epochs; epoch ``e`` lists the source's members
in ``default_rng([seed, crc32(name), e]).permutation``, each member's documents in file order. A
position in the stream is a token count, so progress survives changes of the sequence length. A window
may straddle two members or two epochs. Members are decompressed on demand and kept in a small LRU
cache; only the members that a window touches are read. A source with a loss-mask channel gives each
window's mask from the same positions, so masks follow the tokens through every resume and DP size.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict

import numpy as np

from data_pipeline.shards import MemberReader, SourceIndex


class EpochLayout:
    """Member order and cumulative token offsets of each epoch of one source (metadata only)."""

    def __init__(self, name: str, index: SourceIndex, seed: int):
        self.name = name
        self.member_tokens = index.member_tokens
        self.epoch_tokens = int(self.member_tokens.sum())
        self._seed = [int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode()), 0]
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(member order, start offset of each position in that order) for epoch ``e``."""
        hit = self._cache.get(e)
        if hit is None:
            order = np.random.default_rng(self._seed[:2] + [e]).permutation(self.member_tokens.size)
            starts = np.concatenate(([0], np.cumsum(self.member_tokens[order])[:-1]))
            hit = self._cache[e] = (order, starts)
            if len(self._cache) > 4:
                self._cache.popitem(last=False)
        return hit

    def pieces(self, start: int, length: int) -> list[tuple[int, int, int]]:
        """Split stream window ``[start, start+length)`` into (member, offset in member, count) pieces."""
        out = []
        pos, end = start, start + length
        while pos < end:
            e, off = divmod(pos, self.epoch_tokens)
            order, starts = self.epoch(e)
            k = int(np.searchsorted(starts, off, side="right")) - 1
            member = int(order[k])
            in_member = off - int(starts[k])
            take = min(end - pos, int(self.member_tokens[member]) - in_member)
            out.append((member, in_member, take))
            pos += take
        return out


class SourceStream:
    """Reads token windows of one source's stream (and their loss masks), decompressing members through
    LRU caches."""

    def __init__(self, name: str, index: SourceIndex, seed: int, cache_members: int = 8):
        self.name = name
        self.layout = EpochLayout(name, index, seed)
        self.reader = MemberReader(index)
        self.has_masks = index.has_masks
        self._caches: dict[str, OrderedDict[int, np.ndarray]] = {"tokens": OrderedDict(), "mask": OrderedDict()}
        self._cache_members = cache_members
        self.members_decoded = 0

    def _member(self, m: int, what: str = "tokens") -> np.ndarray:
        cache = self._caches[what]
        arr = cache.get(m)
        if arr is not None:
            cache.move_to_end(m)
            return arr
        arr = self.reader.read(m) if what == "tokens" else self.reader.read_mask(m)
        self.members_decoded += what == "tokens"
        cache[m] = arr
        if len(cache) > self._cache_members:
            cache.popitem(last=False)
        return arr

    def read_into(self, out: np.ndarray, start: int, mask_out: np.ndarray | None = None) -> None:
        """Fill ``out`` (1-D) with the stream's tokens from position ``start``, and ``mask_out`` (same size)
        with their loss mask (all ones for a source without a mask channel)."""
        pos = 0
        for member, off, count in self.layout.pieces(start, out.size):
            out[pos:pos + count] = self._member(member)[off:off + count]
            if mask_out is not None:
                mask_out[pos:pos + count] = self._member(member, "mask")[off:off + count] if self.has_masks else 1
            pos += count

    def close(self) -> None:
        self.reader.close()
        for cache in self._caches.values():
            cache.clear()
