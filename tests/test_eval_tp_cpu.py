"""The loss functions of the recall and decoding suites over tensor-parallel vocabulary shards, on CPU gloo
ranks: the same tokens as an argmax or a sample over the whole vocabulary, padding rows never chosen."""

from __future__ import annotations

import pytest
import torch

from gloo_world import run_ranks

VOCAB, PADDED = 50, 64  # TP=2 shards of 32 columns; ids 50-63 are padding


def _logits(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(1, 12, PADDED, generator=g)
    full[..., VOCAB:] = 100.0  # padding rows must lose however large they are
    full[0, 3, 7] = full[0, 3, 40] = 50.0  # a tie across shards: the lower id wins, as torch.argmax
    return full


def _rank(rank: int, out: dict):
    """One of two tensor-parallel ranks: each holds one vocabulary shard."""
    from hybrid_megatron.eval.decode import next_tokens
    from hybrid_megatron.eval.recall import answer_check, vocab_parallel_argmax

    full = _logits(0)
    part = full[..., rank * 32:(rank + 1) * 32]
    out[f"argmax{rank}"] = vocab_parallel_argmax(part, VOCAB).tolist()
    labels = vocab_parallel_argmax(part, VOCAB).clone()
    labels[0, 5] = (labels[0, 5] + 1) % VOCAB  # one wrong answer
    mask = torch.zeros(1, 12)
    mask[0, [1, 5, 7, 11]] = 1
    _, _, report = answer_check(labels, mask, VOCAB, 6, 2, part)
    out[f"answers{rank}"] = report["answers"].tolist()
    last = torch.tensor([5, 11])
    _, _, greedy = next_tokens(part, last_positions=last, temperature=0.0, generator=None, vocab_size=VOCAB)
    out[f"greedy{rank}"] = greedy["next"].tolist()
    gen = torch.Generator().manual_seed(3)
    _, _, sampled = next_tokens(part, last_positions=last, temperature=1.0, generator=gen, vocab_size=VOCAB)
    out[f"sampled{rank}"] = sampled["next"].tolist()


@pytest.fixture(scope="module")
def outputs():
    return run_ranks(_rank, world=2, tp=2)


def test_the_argmax_over_shards_is_the_argmax_over_the_vocabulary(outputs):
    expected = _logits(0)[..., :VOCAB].argmax(-1).tolist()
    assert outputs["argmax0"] == outputs["argmax1"] == expected
    assert expected[0][3] == 7 and all(i < VOCAB for i in expected[0])


def test_answers_are_checked_per_row_and_alike_on_every_rank(outputs):
    # rows of 6: answers at positions 1, 5 (row 0) and 1, 5 (row 1); position 5 was made wrong
    assert outputs["answers0"] == outputs["answers1"] == [[1.0, 0.0], [1.0, 1.0]]


def test_decoding_picks_the_same_tokens_on_every_tensor_parallel_rank(outputs):
    full = _logits(0)[0, [5, 11], :VOCAB]
    assert outputs["greedy0"] == outputs["greedy1"] == full.argmax(-1).double().tolist()
    assert outputs["sampled0"] == outputs["sampled1"] and all(0 <= t < VOCAB for t in outputs["sampled0"])
