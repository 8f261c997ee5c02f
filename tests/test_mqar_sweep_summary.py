"""benchmarks/mqar_sweep.py's CPU side: one model's row of the recorded sweep, from its ``eval`` results."""

from __future__ import annotations

import json

from benchmarks import mqar_sweep as S
from hybrid_megatron.devtools import REPO_ROOT as ROOT

RECORDED = ROOT / "benchmarks" / "results" / "mqar_sweep_h200"


def test_a_row_keeps_accuracy_by_pairs_and_the_cuts_and_leaves_the_outcomes_to_results_json():
    ev = json.loads((RECORDED / "hybrid" / "results.json").read_text())
    row = S.summary(ev, {500: 6.849412, 1000: 6.62709}, 3000)
    assert row["evaluated_step"] == ev["step"] and row["trained_steps"] == 3000 and row["pattern"] == "M-*-"
    assert row["validation_loss_by_step"] == {"500": 6.8494, "1000": 6.6271}
    cells = ev["suites"]["mqar"]["cells"]
    assert row["mqar_accuracy_by_pairs"] == {str(c["pairs"]): round(c["accuracy"], 4) for c in cells}
    for got, cell in zip(row["state"], ev["suites"]["state"]["cells"], strict=True):
        assert "outcomes" not in got and "items_fingerprint" not in got
        assert got["ssm_cut"] == cell["ssm_cut"] and got["attention_cut"] == cell["attention_cut"]
        assert got["ssm_cut"]["mcnemar_items"]["items"] == 512  # the test over items, as the README prints it


def test_the_recorded_sweep_is_the_summary_of_its_models_results():
    sweep = json.loads((RECORDED / "mqar_sweep.json").read_text())
    for arch, row in sweep["runs"].items():
        ev = json.loads((RECORDED / arch / "results.json").read_text())
        val = {int(s): v for s, v in row["validation_loss_by_step"].items()}
        assert S.summary(ev, val, row["trained_steps"]) == row, arch
