"""`compare` tests runs against each other on the same MQAR items: pairing by item, the test over items, and what
it refuses to pair (other items, results without per-item outcomes)."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.synthetic import MqarOptions
from hybrid_megatron.eval import paired, paired_runs, recall, recall_suites, report
from hybrid_megatron.eval.compare import compare
from tests.run_dirs import write_run

BASE = MqarOptions(num_kv_pairs=(4, 8), seq_len=48, vocab=64, docs=1, seed=0)


def _mqar(rights: dict[int, np.ndarray], seed: int = 9) -> dict:
    """An mqar suite as eval writes it, for cells of these pairs on real items of ``seed``."""
    cells = [recall_suites.cell_accuracy(p, 48, right, 0.1,
                                         recall.mqar_cell(BASE, p, 48, right.shape[0], seed).fingerprint)
             for p, right in rights.items()]
    return {"seed": seed, "items_per_cell": 40, "cells": cells}


def test_runs_on_the_same_items_are_paired_item_by_item():
    rng = np.random.default_rng(0)
    ref4, ref8 = rng.random((40, 4)) < 0.3, rng.random((40, 8)) < 0.2
    better4 = ref4 | (rng.random((40, 4)) < 0.4)
    same8 = rng.random((40, 8)) < 0.2
    out = paired_runs.compare_runs([("attention", _mqar({4: ref4, 8: ref8})), ("untrained", None),
                                    ("hybrid", _mqar({4: better4, 8: same8}))])
    assert out["reference"] == "attention" and out["not_compared"] == []
    four, eight = out["rows"]
    assert (four["run"], four["pairs"], four["seq_len"], four["items"]) == ("hybrid", 4, 48, 40)
    assert four["difference"] == pytest.approx(better4.mean() - ref4.mean())
    assert four["mcnemar_items"] == paired.mcnemar_items(better4, ref4) and four["mcnemar_items"]["p_value"] < 1e-3
    # the pairing is the items': the same outcomes in another item order test differently
    assert eight["mcnemar_items"] == paired.mcnemar_items(same8, ref8)
    shuffled = paired_runs.compare_runs([("attention", _mqar({8: ref8})), ("hybrid", _mqar({8: same8[::-1]}))])
    assert shuffled["rows"][0]["mcnemar_items"] == paired.mcnemar_items(same8[::-1], ref8) != eight["mcnemar_items"]


def test_cells_of_other_items_and_results_without_outcomes_are_named_not_compared():
    rng = np.random.default_rng(1)
    ref = _mqar({4: rng.random((40, 4)) < 0.3})
    other_items = _mqar({4: rng.random((40, 4)) < 0.3}, seed=10)
    older = {"seed": 9, "items_per_cell": 40, "cells": [
        {k: v for k, v in c.items() if k not in ("outcomes", "items_fingerprint")} for c in ref["cells"]]}
    extra_cell = _mqar({4: rng.random((40, 4)) < 0.3, 8: rng.random((40, 8)) < 0.3})
    out = paired_runs.compare_runs([("a", ref), ("b", other_items), ("c", older), ("d", extra_cell)])
    assert [r["run"] for r in out["rows"]] == ["d"]
    assert out["not_compared"] == [
        "c: its eval results keep no per-item outcomes (evaluated before they were recorded; run eval again)",
        "b, 4 pairs at length 48: other items than a's (another item seed or vocabulary)",
        "d, 8 pairs at length 48: a has no outcomes for this cell"]
    assert paired_runs.compare_runs([("a", ref), ("b", None)]) is None
    only_old = paired_runs.compare_runs([("c", older), ("a", ref)])
    assert only_old["rows"] == [] and only_old["reference"] == "a" and len(only_old["not_compared"]) == 1


def test_outcomes_that_do_not_pair_are_one_line():
    from data_pipeline.errors import DataError

    rng = np.random.default_rng(3)
    ref = _mqar({4: rng.random((40, 4)) < 0.3})
    for damage, message in ((lambda o: o[:-1], "paired outcomes must be"), (lambda o: ["xyz"] + o[1:], "not a hex"),
                            (lambda o: ["ff"] + o[1:], "past the item's 4")):
        bad = _mqar({4: rng.random((40, 4)) < 0.3})
        bad["cells"][0]["outcomes"] = damage(bad["cells"][0]["outcomes"])
        with pytest.raises(DataError, match=f"b, 4 pairs at length 48 against a: per-item outcomes that do not "
                                            f"pair .*{message}"):
            paired_runs.compare_runs([("a", ref), ("b", bad)])
    for cells in ("x", ["x"], [{"pairs": "4", "seq_len": 48}], [{"seq_len": 48}]):
        with pytest.raises(DataError, match="b: its mqar results are not cells of pairs and seq_len"):
            paired_runs.compare_runs([("a", ref), ("b", {"cells": cells})])


def test_compare_reports_the_paired_mqar_table(tmp_path):
    rng = np.random.default_rng(2)
    ref = rng.random((40, 4)) < 0.3
    for name, right in (("h256", ref), ("h384", ref | (rng.random((40, 4)) < 0.5))):
        write_run(tmp_path, name, [f"model.hidden_size={name[1:]}"])
        results = {"checkpoint": f"/runs/{name}/checkpoints/step-000100", "step": 100, "pattern": "M-*-",
                   "params": 1000, "layout": {"tp": 1, "pp": 1, "dp": 1}, "suites": {"mqar": _mqar({4: right})}}
        report.write(results, tmp_path / name / "eval" / "step-000100")
    summary = compare([str(tmp_path / "h256"), str(tmp_path / "h384")], tmp_path / "out")
    (row,) = summary["mqar_paired"]["rows"]
    assert row["run"] == "h384" and row["difference"] > 0.2
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## MQAR, run against h256 on the same items" in md
    assert (f"| h384 | 4 | 48 | 40 | {row['accuracy']:.4f} | {ref.mean():.4f} | {row['difference']:+.4f} | "
            f"{report.p_text(row['mcnemar_items']['p_value'])} |") in md
