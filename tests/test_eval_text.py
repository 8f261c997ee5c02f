"""The `niah` and `generation` suites on a CPU: items, prompts, the packed rows decoding feeds the model,
the metrics and the report."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.errors import ConfigError, DataError
from data_pipeline.shards import SourceIndex
from data_pipeline.tokenizer import ByteTokenizer
from hybrid_megatron.eval import needle, report, text_suites
from tests.data_helpers import make_source

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    return {"val": SourceIndex.open(make_source(root, "val", 5, num_docs=80, mean_len=400))}


def _find(hay: np.ndarray, needle_ids: np.ndarray) -> int:
    for i in range(hay.size - needle_ids.size + 1):
        if (hay[i:i + needle_ids.size] == needle_ids).all():
            return i
    return -1


def test_the_needle_sits_at_its_depth_and_the_prompt_has_the_asked_length(held_out):
    hay = needle.filler(held_out, 0, 4096, TOK.eos_id)
    assert hay.size == 4096 and (hay != TOK.eos_id).all()
    (key,) = needle.pass_keys(3, 1)
    assert 10000 <= key < 100000 and needle.pass_keys(3, 4)[0] == key
    sentence = TOK.encode_batch([needle.NEEDLE.format(key=key)])[0]
    question = TOK.encode_batch([needle.QUESTION])[0]
    for depth in (0.0, 0.3, 1.0):
        prompt, answer = needle.niah_item(TOK, hay, 2048, depth, key)
        assert prompt.size == 2048 and TOK.decode(answer) == f" {key}"
        room = 2048 - sentence.size - question.size
        assert _find(prompt, sentence) == round(depth * room)
        assert (prompt[-question.size:] == question).all()
    with pytest.raises(DataError, match="niah needs 100000 of filler"):
        needle.filler(held_out, 0, 100000, TOK.eos_id)
    assert text_suites.depths(11)[::5] == [0.0, 0.5, 1.0] and text_suites.depths(1) == [0.5]


def test_generation_prompts_are_whole_held_out_documents(held_out):
    docs = needle.documents(held_out, 0, TOK.eos_id, 200, 10, scan_tokens=1 << 20)
    assert len(docs) == 10 and all(d.size >= 200 and (d != TOK.eos_id).all() for d in docs)
    with pytest.raises(DataError, match="generation asked for 500"):
        needle.documents(held_out, 0, TOK.eos_id, 200, 500, scan_tokens=1 << 20)


def test_generation_metrics_stop_at_eos():
    eos = 9
    m = text_suites.generation_metrics([[1, 2, 3, eos, 5], [1, 1, 1, 1], [4, 5]], eos, 200)
    # continuations without EOS and beyond: [1,2,3], [1,1,1,1], [4,5]
    assert m["distinct_1"] == pytest.approx(5 / 9) and m["distinct_2"] == pytest.approx(4 / 6)
    assert m["mean_length"] == pytest.approx(3.0) and m["reached_eos"] == pytest.approx(1 / 3)
    assert m["repetition_rate_4"] == pytest.approx((0 + 0 + 0) / 3)


def test_decoding_packs_rows_as_documents_padded_for_sequence_parallelism():
    from hybrid_megatron.eval.decode import packed_rows

    rows = [np.array([5, 6, 7]), np.array([8, 9])]
    mb, last = packed_rows(rows, 4, "cpu")
    assert mb.input_ids.tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]] and last.tolist() == [2, 4]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert mb.packed_seq_params.cu_seqlens_q.tolist() == [0, 3, 5, 8]
    mb, last = packed_rows(rows, 1, "cpu")
    assert mb.packed_seq_params.cu_seqlens_q.tolist() == [0, 3, 5] and mb.input_ids.shape == (1, 5)


def test_the_report_shows_niah_and_generation(tmp_path):
    cells = [{"length": k * 1024, "multiple": k, "depth": d, "accuracy": 1.0 - d / k, "items": 8, "seconds": 1.0}
             for k in (1, 2) for d in (0.0, 0.5, 1.0)]
    gen = {"prompts": 4, "prompt_tokens": 128, "by_temperature": {str(t): {
        **text_suites.generation_metrics([[1, 2, 3], [4, 4, 4, 4]], 9, 200),
        "samples": [{"prompt": "def f(", "continuation": "x):"}]} for t in (0.0, 0.7, 1.0)}}
    results = {"checkpoint": "/x/step-000001", "step": 1, "pattern": "M-*-", "params": 1,
               "layout": {"tp": 1, "pp": 1, "dp": 1},
               "suites": {"niah": {"train_len": 1024, "items_per_cell": 8, "cells": cells}, "generation": gen}}
    report.write(results, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| 50% | 0.50 | 0.75 |" in md and "### Samples at temperature 0.7" in md and "def f( ⟶ x):" in md
    assert (tmp_path / "niah.png").read_bytes()[:4] == b"\x89PNG"
    head = report.headline(results)
    assert head["niah/2x/accuracy"] == pytest.approx(0.75) and "generation/t1.0/distinct_2" in head


def test_the_data_tokenizer_comes_from_the_checkpoints_record(tmp_path):
    import json

    from hybrid_megatron.checkpoint import layout
    from hybrid_megatron.config import load_run_config
    from hybrid_megatron.devtools import REPO_ROOT
    from hybrid_megatron.eval.run import data_tokenizer

    cfg = load_run_config(REPO_ROOT / "configs" / "tiny.yaml")
    (tmp_path / layout.DATA_TOKENIZER).write_text(json.dumps(TOK.describe()))
    assert isinstance(data_tokenizer(tmp_path, cfg), ByteTokenizer)
    (tmp_path / layout.DATA_TOKENIZER).write_text(json.dumps({"kind": "hf", "path": "/nonexistent", "vocab_size": 9,
                                                              "fingerprint": "x", "eos_id": 1}))
    with pytest.raises(ConfigError, match="needs the data's tokenizer: hf tokenizer /nonexistent"):
        data_tokenizer(tmp_path, cfg)
