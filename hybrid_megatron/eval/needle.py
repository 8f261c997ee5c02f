"""Needle-in-a-haystack items (``niah``) and held-out prompts (``generation``), built on a CPU from the
validation data and the run's own tokenizer.

A niah item hides a sentence with a five-digit pass key in filler text at a depth (0% = the start, 100% =
right before the question), asks for the key at the end, and counts as right when the greedy continuation
is exactly the key's tokens. The filler is the validation stream with its EOS tokens dropped: with documents
packed, an EOS would start a new document and hide the needle by construction, not by forgetting.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.errors import DataError

NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER = " {key}"


def filler(indexes: dict, seed: int, tokens: int, eos_id: int) -> np.ndarray:
    """``tokens`` tokens of the validation sources (in name order), EOS dropped."""
    from data_pipeline.streams import SourceStream

    parts, have = [], 0
    for name in sorted(indexes):
        stream = SourceStream(name, indexes[name], seed)
        try:
            take = min(indexes[name].num_tokens, 2 * tokens)
            buf = np.empty(take, np.int64)
            stream.read_into(buf, 0)
        finally:
            stream.close()
        buf = buf[buf != eos_id]
        parts.append(buf)
        have += buf.size
        if have >= tokens:
            break
    if have < tokens:
        raise DataError(f"the validation sources hold {have} tokens besides EOS; niah needs {tokens} of filler")
    return np.concatenate(parts)[:tokens]


def niah_item(tokenizer, hay: np.ndarray, length: int, depth: float, key: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt of exactly ``length`` tokens, answer tokens) with the needle at ``depth`` in [0, 1]."""
    needle, question, answer = tokenizer.encode_batch([NEEDLE.format(key=key), QUESTION, ANSWER.format(key=key)])
    room = length - needle.size - question.size
    if room < 0:
        raise ValueError(f"a context of {length} tokens cannot hold the needle and the question")
    if hay.size < room:
        raise ValueError(f"{hay.size} filler tokens for a context of {length}")
    at = int(round(depth * room))
    prompt = np.concatenate([hay[:at], needle, hay[at:room], question]).astype(np.int64)
    return prompt, answer.astype(np.int64)


def pass_keys(seed: int, count: int) -> list[int]:
    return np.random.default_rng([seed, 4242]).integers(10000, 100000, size=count).tolist()


def documents(indexes: dict, seed: int, eos_id: int, min_tokens: int, count: int, scan_tokens: int) -> list[np.ndarray]:
    """The first ``count`` documents of at least ``min_tokens`` tokens in the validation streams (name order),
    reading at most ``scan_tokens`` tokens of each source."""
    from data_pipeline.streams import SourceStream

    out = []
    for name in sorted(indexes):
        stream = SourceStream(name, indexes[name], seed)
        try:
            buf = np.empty(min(indexes[name].num_tokens, scan_tokens), np.int64)
            stream.read_into(buf, 0)
        finally:
            stream.close()
        ends = np.flatnonzero(buf == eos_id)
        starts = np.concatenate(([0], ends[:-1] + 1))
        for s, e in zip(starts, ends):  # an epoch starts at a member, members hold whole documents
            if e - s >= min_tokens:
                out.append(buf[s:e])
                if len(out) == count:
                    return out
    if len(out) < count:
        raise DataError(f"the validation sources hold {len(out)} documents of {min_tokens}+ tokens in their first "
                        f"{scan_tokens} tokens; generation asked for {count}")
    return out
