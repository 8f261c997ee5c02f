"""Synthetic sources with a loss mask: multi-query associative recall (MQAR), as Zoology defines the task.

An item binds ``N`` keys to values, then asks for every key again in another order; the model must answer
each query with the value bound to that key earlier in the same item. Only the answers are trained (the
source's loss-mask channel), so the loss measures recall and nothing else. One item is one document of
exactly ``seq_len`` tokens, EOS included::

    k1 v1 k2 v2 ... kN vN  PAD ... PAD  q1 a1 q2 a2 ... qN aN  EOS
                                         (mask: 1 on every a_i, 0 elsewhere)

Vocabulary of ``vocab`` ids: keys ``[0, K)``, values ``[K, vocab - 2)`` with ``K = (vocab - 2) // 2``, then PAD
(``vocab - 2``) and EOS (``vocab - 1``). Keys are distinct within an item; values are drawn with repetition.
The gap between the bindings and the queries (the PAD run) is what grows with ``seq_len``. Items cycle
through the ``num_kv_pairs`` values; item ``i`` is drawn from ``default_rng([seed, i])``, so any item can be
regenerated alone and the output is the same for the same options.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_pipeline.errors import ConfigError
from data_pipeline.shards import INDEX_NAME, STATS_NAME, ShardWriter, write_json_atomic

log = logging.getLogger(__name__)
TASK = "mqar"
FORMAT_VERSION = 1
ITEMS_PER_MEMBER = 1024


@dataclass(frozen=True, slots=True)
class MqarOptions:
    num_kv_pairs: tuple[int, ...]
    seq_len: int
    vocab: int
    docs: int
    seed: int

    @property
    def pad_id(self) -> int:
        return self.vocab - 2

    @property
    def eos_id(self) -> int:
        return self.vocab - 1

    @property
    def num_keys(self) -> int:
        return (self.vocab - 2) // 2

    def check(self) -> None:
        if self.docs < 1:
            raise ConfigError(f"--docs {self.docs}: must be at least 1")
        if not self.num_kv_pairs or min(self.num_kv_pairs) < 1:
            raise ConfigError(f"--num-kv-pairs {list(self.num_kv_pairs)}: needs positive counts")
        most = max(self.num_kv_pairs)
        if 4 * most + 1 > self.seq_len:
            raise ConfigError(f"--seq-len {self.seq_len}: too short for {most} key-value pairs (needs 4 x pairs + 1 "
                              f"= {4 * most + 1} tokens: bindings, queries with answers, EOS)")
        if self.num_keys < most:
            raise ConfigError(f"--vocab {self.vocab}: {self.num_keys} keys cannot give {most} distinct keys per item")
        if self.vocab > 2**31:
            raise ConfigError(f"--vocab {self.vocab}: must be below 2^31")

    def tokenizer(self) -> dict:
        """What the source records as its tokenizer (the training and validation sources must agree)."""
        return {"kind": "synthetic", "task": TASK, "fingerprint": f"{TASK}-v{FORMAT_VERSION}-vocab{self.vocab}",
                "eos_id": self.eos_id, "vocab_size": self.vocab}


def item(opts: MqarOptions, i: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens, loss mask, number of pairs) of item ``i``."""
    n = opts.num_kv_pairs[i % len(opts.num_kv_pairs)]
    rng = np.random.default_rng([opts.seed, i])
    keys = rng.choice(opts.num_keys, size=n, replace=False)
    values = rng.integers(opts.num_keys, opts.pad_id, size=n)
    order = rng.permutation(n)
    tokens = np.full(opts.seq_len, opts.pad_id, np.int64)
    tokens[0:2 * n:2], tokens[1:2 * n:2] = keys, values
    q0 = opts.seq_len - 1 - 2 * n
    tokens[q0:opts.seq_len - 1:2] = keys[order]
    tokens[q0 + 1:opts.seq_len - 1:2] = values[order]
    tokens[-1] = opts.eos_id
    mask = np.zeros(opts.seq_len, np.uint8)
    mask[q0 + 1:opts.seq_len - 1:2] = 1
    return tokens, mask, n


def write_mqar(output: str | Path, opts: MqarOptions, source: str = TASK, overwrite: bool = False,
               progress: bool = True) -> dict:
    """Writes ``opts.docs`` items as a source directory with a loss-mask channel; returns its stats."""
    from tqdm import tqdm

    from data_pipeline.prepare import prepare_output

    opts.check()
    out = Path(output)
    prepare_output(out, overwrite)
    dtype = np.uint16 if opts.vocab <= 2**16 else np.uint32
    writer = ShardWriter(out, 256 * 1024 * 1024, opts.vocab, masks=True)
    start = time.perf_counter()
    by_pairs: dict[int, int] = {}
    with tqdm(total=opts.docs, unit="item", desc=f"mqar {source}", disable=not progress) as bar:
        for first in range(0, opts.docs, ITEMS_PER_MEMBER):
            count = min(ITEMS_PER_MEMBER, opts.docs - first)
            toks, masks = np.empty((count, opts.seq_len), dtype), np.empty((count, opts.seq_len), np.uint8)
            for row in range(count):
                toks[row], masks[row], n = item(opts, first + row)
                by_pairs[n] = by_pairs.get(n, 0) + 1
            writer.add(toks.reshape(-1), count, masks.reshape(-1))
            bar.update(count)
    index = writer.finish(dtype, opts.eos_id)
    stats = {"source": source, "documents": opts.docs, "tokens": opts.docs * opts.seq_len,
             "members": len(index["members"]["name"]), "shards": len(index["shards"]), "dtype": index["dtype"],
             "tokenizer": opts.tokenizer(), "vocab_size": opts.vocab, "eos_id": opts.eos_id,
             "synthetic": {"task": TASK, "version": FORMAT_VERSION, **asdict(opts), "pad_id": opts.pad_id,
                           "num_keys": opts.num_keys, "items_by_pairs": dict(sorted(by_pairs.items()))}}
    write_json_atomic(out / STATS_NAME, stats)
    write_json_atomic(out / INDEX_NAME, index)  # last: its presence marks a complete output
    log.info("mqar %s: %d items of %d tokens (pairs %s) in %.1f s -> %s", source, opts.docs, opts.seq_len,
             list(opts.num_kv_pairs), time.perf_counter() - start, out)
    return stats
