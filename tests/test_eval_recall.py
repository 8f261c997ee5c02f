"""The `mqar` and `state` suites on a CPU: the items and the arrays the model gets, the cut positions, the
checks before any GPU work, and the statistics and report built from the paired outcomes."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.errors import ConfigError
from data_pipeline.synthetic import MqarOptions, write_mqar
from hybrid_megatron.config import load_run_config
from hybrid_megatron.devtools import REPO_ROOT
from hybrid_megatron.eval import recall, recall_suites, report
from hybrid_megatron.eval.suites import EvalOptions
from tests.data_helpers import make_source

BASE = MqarOptions(num_kv_pairs=(2, 4), seq_len=40, vocab=64, docs=1, seed=0)


def test_item_rows_train_on_answers_after_their_query_keys():
    cell = recall.mqar_cell(BASE, 4, 40, 12, seed=9)
    assert cell.query_start == 40 - 1 - 8 and cell.tokens.shape == (12, 40)
    batch = recall.item_batch(cell, slice(0, 12), BASE.pad_id, BASE.eos_id)
    assert batch.input_ids.shape == (12, 40) and (batch.input_ids == cell.tokens).all()
    answers = batch.labels[batch.loss_mask == 1].reshape(12, 4)
    for row in range(12):
        toks = cell.tokens[row]
        bound = dict(zip(toks[0:8:2].tolist(), toks[1:8:2].tolist()))
        queries = batch.input_ids[row][batch.loss_mask[row] == 1]
        assert [bound[q] for q in queries.tolist()] == answers[row].tolist()
    assert (batch.seq_idx == 0).all() and (batch.position_ids == np.arange(40)).all()
    cut = recall.cut_rows(batch, cell.query_start)
    assert (cut.seq_idx[:, :cell.query_start] == 0).all() and (cut.seq_idx[:, cell.query_start:] == 1).all()
    assert (cut.input_ids == batch.input_ids).all() and (cut.loss_mask == batch.loss_mask).all()


@pytest.fixture(scope="module")
def mqar_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mqar")
    write_mqar(root / "train", MqarOptions(num_kv_pairs=(4, 8), seq_len=64, vocab=128, docs=64, seed=0),
               progress=False)
    write_mqar(root / "val", MqarOptions(num_kv_pairs=(4, 8), seq_len=64, vocab=128, docs=64, seed=1),
               progress=False)
    return root


def _cfg(root, *extra):
    return load_run_config(REPO_ROOT / "configs" / "mqar" / "hybrid.yaml",
                           [f"data.sources.mqar={root / 'train'}", f"data.validation.sources.mqar_val={root / 'val'}",
                            "data.seq_len=64", "model.vocab_size=128", *extra])


def test_the_grid_comes_from_the_training_source_and_never_reuses_its_seeds(mqar_run):
    base, cells, seed = recall_suites.grid(_cfg(mqar_run), EvalOptions(suites=["mqar"]))
    assert (base.vocab, base.seq_len, base.num_kv_pairs) == (128, 64, (4, 8))
    assert cells == [(4, 64), (8, 64)] and seed not in (0, 1)
    _, cells, _ = recall_suites.grid(_cfg(mqar_run), EvalOptions(suites=["mqar"], kv_pairs=[2], seq_lens=[64, 128]))
    assert cells == [(2, 64), (2, 128)]
    for opts, message in (
        (EvalOptions(suites=["mqar"], seed=1), "--seed 1: the run's MQAR sources were written with it"),
        (EvalOptions(suites=["mqar"], kv_pairs=[40]), "too short for 40 key-value pairs"),
        (EvalOptions(suites=["state"], attention_window=40), "--attention-window 40: the PAD run"),
    ):
        with pytest.raises(ConfigError, match=message):
            recall_suites.grid(_cfg(mqar_run), opts)
    with pytest.raises(ConfigError, match="data.reset_at_document_boundaries=true"):
        recall_suites.grid(_cfg(mqar_run, "data.reset_at_document_boundaries=false"), EvalOptions(suites=["mqar"]))


def test_a_model_not_trained_on_mqar_is_refused(tmp_path):
    plain = make_source(tmp_path, "plain", 1, num_docs=40, mean_len=200)
    cfg = load_run_config(REPO_ROOT / "configs" / "tiny.yaml", [f"data.sources.code={plain}",
                                                                f"data.sources.tests={plain}",
                                                                f"data.sources.docs={plain}", "data.validation=null",
                                                                "train.eval_interval=null"])
    with pytest.raises(ConfigError, match="needs a model trained on an MQAR source"):
        recall_suites.grid(cfg, EvalOptions(suites=["state"]))


def test_state_statistics_from_paired_outcomes():
    from hybrid_megatron.eval.paired import mcnemar_items, unpack_outcomes

    rng = np.random.default_rng(0)
    full = rng.random((128, 4)) < 0.9
    ssm = full & (rng.random((128, 4)) < 0.3)  # the SSM cut loses most answers
    row = recall_suites.state_cell(4, 64, {"full": full, "ssm_cut": ssm, "attention_cut": None}, "f00d")
    assert row["answers"] == 512 and row["accuracy"]["full"] == pytest.approx(full.mean())
    assert row["ssm_cut"]["reliance"] == pytest.approx((full.mean() - ssm.mean()) / full.mean())
    m = row["ssm_cut"]["mcnemar"]
    assert m["b"] == int((full & ~ssm).sum()) and m["c"] == 0 and m["p_value"] < 1e-30
    items = row["ssm_cut"]["mcnemar_items"]
    assert items == mcnemar_items(full, ssm) and items["items"] == 128 and (items["b"], items["c"]) == (m["b"], 0)
    # all one way: p = 2^(1 - discordant items) over items, 2^(1 - b) over answers
    assert items["p_value"] == pytest.approx(2.0 ** (1 - items["discordant_items"]), rel=1e-12)
    assert m["p_value"] == pytest.approx(2.0 ** (1 - m["b"]), rel=1e-12) and m["p_value"] < items["p_value"] < 1e-30
    assert row["attention_cut"].startswith("not applicable")
    # the outcomes are kept per item, exactly, for a later paired comparison; a cut that does not apply has none
    assert row["items_fingerprint"] == "f00d" and set(row["outcomes"]) == {"full", "ssm_cut"}
    assert (unpack_outcomes(row["outcomes"]["ssm_cut"], 4) == ssm).all()
    acc = recall_suites.cell_accuracy(4, 64, full, 1.0, "f00d")
    assert acc["accuracy"] == pytest.approx(full.mean()) and acc["items_all_right"] == pytest.approx(full.all(1).mean())
    assert (unpack_outcomes(acc["outcomes"], 4) == full).all() and acc["items_fingerprint"] == "f00d"


def test_the_fingerprint_names_the_items():
    a = recall.mqar_cell(BASE, 4, 40, 12, seed=9)
    assert a.fingerprint == recall.mqar_cell(BASE, 4, 40, 12, seed=9).fingerprint  # the same items again
    others = [recall.mqar_cell(BASE, 4, 40, 12, seed=10), recall.mqar_cell(BASE, 2, 40, 12, seed=9),
              recall.mqar_cell(BASE, 4, 40, 11, seed=9),
              recall.mqar_cell(MqarOptions(num_kv_pairs=(2, 4), seq_len=40, vocab=96, docs=1, seed=0), 4, 40, 12, 9)]
    assert len({a.fingerprint, *(c.fingerprint for c in others)}) == 5


def test_the_report_shows_mqar_and_state(tmp_path):
    rng = np.random.default_rng(1)
    full = rng.random((64, 4)) < 0.8
    results = {"checkpoint": "/x/step-000100", "step": 100, "pattern": "M-*-", "params": 5_000_000,
               "layout": {"tp": 1, "pp": 1, "dp": 1}, "suites": {
                   "mqar": {"seed": 7, "items_per_cell": 64, "cells": [
                       recall_suites.cell_accuracy(p, 64, rng.random((64, p)) < 1 / p, 1.0, "f00d") for p in (2, 4, 8)]},
                   "state": {"seed": 7, "items_per_cell": 64, "attention_window": 0, "cells": [recall_suites.state_cell(
                       4, 64, {"full": full, "ssm_cut": full & (rng.random((64, 4)) < 0.5),
                               "attention_cut": full & (rng.random((64, 4)) < 0.1)}, "f00d")]}}}
    report.write(results, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Multi-query associative recall (`mqar`)" in md and "## Memory reliance (`state`)" in md
    for png in ("mqar.png", "state.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    head = report.headline(results)
    assert "mqar/64/8/accuracy" in head and "state/64/4/ssm_cut/reliance" in head
    # the p-value shown is the test over items; results from before it show the one over answers, marked
    cut = results["suites"]["state"]["cells"][0]["ssm_cut"]
    assert report.cut_p_value(cut) == f"{cut['mcnemar_items']['p_value']:.2g}" and f" {report.cut_p_value(cut)} |" in md
    older = {k: v for k, v in cut.items() if k != "mcnemar_items"}
    assert report.cut_p_value(older) == f"{cut['mcnemar']['p_value']:.2g}*"
    assert report.cut_p_value({"mcnemar_items": {"p_value": 0.0}}) == "< 1e-300"
