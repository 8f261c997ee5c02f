"""Packed documents padded to a multiple of ``data.document_multiple`` (what context parallelism's per-document
split needs): every document starts and spans a multiple of it, every token kept is the token it was (input,
label, loss mask, position, document) in the same order, pads are never trained, and what the padding pushes
out of a row is exactly its last tokens, counted; through the real loader and validation set, deterministic and
resumable; the config refuses what cannot hold padded documents with one line."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.errors import ConfigError
from data_pipeline.loader import build_loader
from data_pipeline.packing import build_arrays, pad_documents
from tests.data_helpers import make_source, mix_config

EOS = 0


def _row(doc_lengths: list[int]) -> np.ndarray:
    """One window of documents of these lengths (each ending in EOS), tokens numbered 1.. otherwise."""
    tokens = []
    for n in doc_lengths:
        tokens += list(range(len(tokens) + 1, len(tokens) + n)) + [EOS]
    return np.array([tokens], dtype=np.int64)


def _spans(seq_idx_row: np.ndarray) -> list[tuple[int, int]]:
    starts = list(np.flatnonzero(np.r_[True, seq_idx_row[1:] != seq_idx_row[:-1]])) + [len(seq_idx_row)]
    return list(zip(starts[:-1], starts[1:]))


def test_documents_start_at_multiples_and_the_overflow_is_the_rows_last_tokens():
    window = _row([5, 3, 9, 8])[:, :25]  # 24 inputs: documents of 5, 3, 9 and the first 7 of the last
    plain = build_arrays(window, EOS, reset=True, eod_mask_loss=False)
    padded = build_arrays(window, EOS, reset=True, eod_mask_loss=False, document_multiple=4)
    # 5 -> 8, 3 -> 4, 9 -> 12: the third ends the row, the fourth (7 tokens) does not fit
    assert _spans(padded["seq_idx"][0]) == [(0, 8), (8, 12), (12, 24)]
    assert padded["dropped_tokens"].tolist() == [7]
    real = padded["loss_mask"][0] > 0
    assert real.sum() == 24 - 7
    for key in ("input_ids", "labels", "position_ids", "seq_idx"):
        np.testing.assert_array_equal(padded[key][0][real], plain[key][0][:17], err_msg=key)
    assert padded["input_ids"][0][~real].tolist() == [EOS] * 7 and padded["labels"][0][~real].tolist() == [EOS] * 7
    assert padded["position_ids"][0].tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]


@pytest.mark.parametrize("multiple", [2, 4, 16])
def test_random_rows_keep_a_prefix_of_their_tokens_and_every_span_is_a_multiple(multiple):
    rng = np.random.default_rng(multiple)
    windows = rng.integers(1, 50, size=(6, 129))
    windows[rng.random(windows.shape) < 0.06] = EOS  # documents of ~16 tokens, some of one token
    targets = (rng.random(windows.shape) < 0.8).astype(np.uint8)
    plain = build_arrays(windows, EOS, True, True, targets)
    padded = build_arrays(windows, EOS, True, True, targets, document_multiple=multiple)
    for r in range(6):
        spans = _spans(padded["seq_idx"][r])
        assert all(a % multiple == 0 and (b - a) % multiple == 0 for a, b in spans)
        kept = 128 - padded["dropped_tokens"][r]
        is_real = np.zeros(128, bool)
        for (a, b), doc in zip(spans, np.unique(padded["seq_idx"][r])):
            n = min(int((plain["seq_idx"][r] == doc).sum()), b - a)
            is_real[a:a + n] = True  # each span: its document's tokens first, then pads
        assert is_real.sum() == kept
        for key in ("input_ids", "labels", "loss_mask", "position_ids", "seq_idx"):
            np.testing.assert_array_equal(padded[key][r][is_real], plain[key][r][:kept], err_msg=key)
        assert not padded["loss_mask"][r][~is_real].any()  # pads are never trained
        assert padded["dropped_tokens"][r] <= (len(spans) - 1) * (multiple - 1) + (multiple - 1)


def test_padding_needs_whole_multiples_and_packed_rows():
    with pytest.raises(ValueError, match="rows of 24 tokens do not hold whole documents padded to a multiple of 5"):
        pad_documents(build_arrays(_row([5, 3, 9, 8])[:, :25], EOS, True, False), 5, EOS)
    with pytest.raises(ValueError, match="needs reset_at_document_boundaries"):
        build_arrays(_row([5, 3, 9, 8])[:, :25], EOS, False, False, document_multiple=4)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {"a": make_source(root, "a", 1, mean_len=120), "b": make_source(root, "b", 2, mean_len=120),
            "c": make_source(root, "c", 3, mean_len=120)}


def _batches(config: DataConfig, steps: int, rank: int = 0, dp: int = 1, state=None):
    loader = build_loader(config, rank, dp)
    try:
        if state is not None:
            loader.load_state_dict(state)
        return [next(loader) for _ in range(steps)], loader.state_dict()
    finally:
        loader.close()


def test_the_loader_pads_every_step_deterministically_and_resumes(sources):
    config = mix_config(sources, document_multiple=8, curriculum=None)
    plain, _ = _batches(mix_config(sources, curriculum=None), 6)
    straight, _ = _batches(config, 6)
    first, state = _batches(config, 3)
    resumed, _ = _batches(config, 3, state=state)
    for a, b in zip(straight, first + resumed):
        assert a.hashes == b.hashes and a.dropped_tokens == b.dropped_tokens
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
    for p, b in zip(plain, straight):
        assert p.hashes == b.hashes  # the same windows in the same order: only their layout changed
        assert 0 < b.dropped_tokens < 0.2 * b.num_tokens  # documents of ~120 bytes, up to 7 pads each
        assert all(a % 8 == 0 and (e - a) % 8 == 0 for row in b.seq_idx for a, e in _spans(row))
        assert b.loss_mask.sum() == p.loss_mask.sum() - b.dropped_tokens  # every pad masked, every kept token not


def test_the_validation_set_pads_as_training_does(sources, tmp_path):
    from data_pipeline.validation import ValidationSet

    val = {"sources": {"v": str(make_source(tmp_path, "v", 9, mean_len=120))}, "tokens": 2048}
    config = mix_config(sources, document_multiple=8, curriculum=None, validation=val)
    batch = next(ValidationSet(config, 0, 1, 256).batches())
    assert batch.dropped_tokens > 0
    assert all(a % 8 == 0 and (e - a) % 8 == 0 for row in batch.seq_idx for a, e in _spans(row))


def test_the_config_refuses_what_cannot_hold_padded_documents(sources):
    with pytest.raises(ConfigError, match=r"data.document_multiple=4: pads packed documents: needs "
                                          r"data.reset_at_document_boundaries=true"):
        mix_config(sources, document_multiple=4, reset_at_document_boundaries=False)
    with pytest.raises(ConfigError, match=r"data.seq_len=100: must be a multiple of data.document_multiple=8"):
        mix_config(sources, document_multiple=8, curriculum=None, seq_len=100)
    with pytest.raises(ConfigError, match=r"data.curriculum.min_seq_len=64: must be a multiple of data.document_multiple=128"):
        mix_config(sources, document_multiple=128, global_batch_tokens=65536)
    with pytest.raises(ConfigError, match="data.document_multiple=0: must be positive"):
        mix_config(sources, document_multiple=0)
    assert mix_config(sources).fingerprint() == mix_config(sources, document_multiple=1).fingerprint()
    assert mix_config(sources).fingerprint() != mix_config(sources, document_multiple=2).fingerprint()
