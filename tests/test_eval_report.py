"""What `eval` writes (results.json, report.md, PNGs) and how `compare` shows eval results side by side."""

from __future__ import annotations

import json

import pytest

from hybrid_megatron.eval import report
from hybrid_megatron.eval.compare import compare
from tests.run_dirs import write_run

PNG = b"\x89PNG\r\n\x1a\n"


def _results(step: int, loss: float) -> dict:
    bins = [{"start": b * 128, "end": (b + 1) * 128, "loss": loss + 1.0 / (b + 1), "tokens": 1000} for b in range(16)]
    return {
        "checkpoint": f"/runs/x/checkpoints/step-{step:06d}", "step": step, "pattern": "M-M*-", "params": 1234567,
        "layout": {"tp": 1, "pp": 1, "dp": 1},
        "suites": {
            "ppl": {"loss": loss, "ppl": 2.0, "tokens": 2048, "seq_len": 1024,
                    "by_source": {"code_val": {"loss": loss - 0.1, "ppl": 1.9, "tokens": 1024},
                                  "tests_val": {"loss": loss + 0.1, "ppl": 2.1, "tokens": 1024}}},
            "length": {"train_len": 1024, "bin_size": 128, "by_length": {
                "1x": {"window": 1024, "loss": loss, "ppl": 2.0, "tokens": 8000, "beyond_train_len": None,
                       "bins": bins[:8]},
                "2x": {"window": 2048, "loss": loss + 0.05, "ppl": 2.1, "tokens": 16000,
                       "beyond_train_len": {"loss": loss + 0.2, "ppl": 2.3, "tokens": 8000}, "bins": bins}}},
            "lm-eval": {"tasks": {"python_next_line": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.75,
                                                       "acc_norm_stderr": 0.09}},
                        "samples": {"python_next_line": 24}, "num_fewshot": {}, "limit": None, "dtype": "bfloat16",
                        "device": "cuda", "lm_eval_version": "0.4.13", "task_dir": None},
        },
    }


def test_write_gives_json_markdown_and_a_plot_per_suite(tmp_path):
    report.write(_results(400, 1.3), tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["plots"] == {"ppl": "ppl.png", "length": "length.png", "lm-eval": "lm_eval.png"}
    for png in written["plots"].values():
        assert (tmp_path / png).read_bytes()[:8] == PNG
    md = (tmp_path / "report.md").read_text()
    assert "| code_val | 1.2000 |" in md and "| **all** | **1.3000** |" in md
    assert "| 2x (2048) | 1.3500 | 16,000 | 1.5000 (8,000 tokens) |" in md
    assert "| python_next_line | acc | 0.5000 | 0.1000 | 24 |" in md
    assert not list(tmp_path.glob(".*.tmp"))


def test_headline_numbers():
    h = report.headline(_results(400, 1.3))
    assert h["ppl/loss"] == 1.3 and h["ppl/loss/tests_val"] == pytest.approx(1.4)
    assert h["length/2x/loss"] == pytest.approx(1.35)
    assert h["lm-eval/python_next_line/acc_norm"] == 0.75 and "lm-eval/python_next_line/acc_stderr" not in h


def test_compare_shows_each_runs_latest_eval_side_by_side(tmp_path):
    for h in (256, 384):
        write_run(tmp_path, f"h{h}", [f"model.hidden_size={h}"])
    report.write(_results(100, 2.0), tmp_path / "h256" / "eval" / "step-000100")
    report.write(_results(50, 1.5), tmp_path / "h256" / "eval" / "step-000050")
    summary = compare([str(tmp_path / "h256"), str(tmp_path / "h384")], tmp_path / "out")
    first, second = summary["runs"]
    assert first["eval_step"] == 100 and first["eval"]["ppl/loss"] == 2.0
    assert second["eval_step"] is None and second["eval"] == {}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| metric | h256 (step 100) | h384 |" in md and "| ppl/loss | 2.0000 | - |" in md


def test_damaged_results_are_one_line(tmp_path):
    from data_pipeline.errors import DataError

    write_run(tmp_path, "h256", ["model.hidden_size=256"])
    bad = tmp_path / "h256" / "eval" / "step-000010"
    bad.mkdir(parents=True)
    (bad / "results.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable eval results"):
        compare([str(tmp_path / "h256")], tmp_path / "out")
    results = _results(10, 1.0)
    del results["suites"]["ppl"]["by_source"]
    (bad / "results.json").write_text(json.dumps(results))
    with pytest.raises(DataError, match=r"h256/eval/step-000010/results.json: not what eval writes \(KeyError"):
        compare([str(tmp_path / "h256")], tmp_path / "out")


def test_compare_draws_every_evaluated_checkpoint_against_tokens(tmp_path):
    """Three evaluated checkpoints of one run and two of another: each metric a panel, a line per run, x the
    input tokens at the evaluated step; a run evaluated once is in the table, not on a curve."""
    for name in ("a", "b", "c"):
        write_run(tmp_path, name, ["model.hidden_size=256"], steps=100)
    for step, loss in ((25, 3.0), (50, 2.5), (100, 2.0)):
        report.write(_results(step, loss), tmp_path / "a" / "eval" / f"step-{step:06d}")
    for step in (50, 100):
        report.write(_results(step, 2.2), tmp_path / "b" / "eval" / f"step-{step:06d}")
    report.write(_results(100, 1.9), tmp_path / "c" / "eval" / "step-000100")
    summary = compare([str(tmp_path / n) for n in "abc"], tmp_path / "out")
    a, b, c = summary["runs"]
    per_step = a["tokens"] // 100
    assert [(e["step"], e["tokens"], e["metrics"]["ppl/loss"]) for e in a["evals"]] == [
        (25, 25 * per_step, 3.0), (50, 50 * per_step, 2.5), (100, 100 * per_step, 2.0)]
    assert a["eval_step"] == 100 and a["eval"]["ppl/loss"] == 2.0 and len(b["evals"]) == 2 and len(c["evals"]) == 1
    curves = summary["eval_curves"]
    assert curves["plotted"][:3] == ["ppl/loss", "ppl/loss/code_val", "ppl/loss/tests_val"]  # ppl first
    assert "lm-eval/python_next_line/acc" in curves["plotted"] and curves["left_out"] == []
    assert (tmp_path / "out" / "evals_vs_tokens.png").read_bytes()[:8] == PNG
    assert "## Evaluations over training" in (tmp_path / "out" / "report.md").read_text()
    # one evaluation per run is no curve
    assert compare([str(tmp_path / "c")], tmp_path / "one")["eval_curves"] is None
    assert not (tmp_path / "one" / "evals_vs_tokens.png").exists()


def test_a_step_evaluated_into_two_directories_is_one_line(tmp_path):
    from data_pipeline.errors import DataError

    write_run(tmp_path, "a", ["model.hidden_size=256"])
    report.write(_results(50, 2.0), tmp_path / "a" / "eval" / "step-000050")
    report.write(_results(50, 2.1), tmp_path / "a" / "eval" / "step-50")
    with pytest.raises(DataError, match=r"a/eval: step 50 evaluated in two directories; keep one"):
        compare([str(tmp_path / "a")], tmp_path / "out")


def test_compare_sets_the_validation_sources_side_by_side(tmp_path):
    """A run validating on two sources: their last losses per run in a table and their curves against tokens."""
    for name, shift in (("a", 0.0), ("b", 0.1)):
        write_run(tmp_path, name, ["model.hidden_size=256"], steps=100)
        with open(tmp_path / name / "val.jsonl", "w") as f:
            for step in (25, 50, 100):
                f.write(json.dumps({"step": step, "tokens": 1000, "loss": 2.0 + shift + 1 / step, "seconds": 1.0,
                                    "loss_by_source": {"code_val": 1.9 + shift + 1 / step,
                                                       "tests_val": 2.1 + shift + 1 / step}}) + "\n")
    summary = compare([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "out")
    assert summary["validation_by_source"]["b"] == pytest.approx(
        {"validation": 2.11, "validation/code_val": 2.01, "validation/tests_val": 2.21})
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| code_val | 1.9100 | 2.0100 |" in md and "| tests_val | 2.1100 | 2.2100 |" in md
    assert (tmp_path / "out" / "validation_by_source.png").read_bytes()[:8] == PNG
    # without sources (or one) there is nothing to add to loss_vs_tokens.png
    assert compare([str(tmp_path / "a")], tmp_path / "one")["validation_by_source"] is not None
    write_run(tmp_path, "c", ["model.hidden_size=256"])
    assert compare([str(tmp_path / "c")], tmp_path / "none")["validation_by_source"] is None
    assert not (tmp_path / "none" / "validation_by_source.png").exists()


def test_more_metrics_than_panels_are_named_not_drawn(tmp_path):
    from hybrid_megatron.eval import eval_curves

    curves = {"a": [eval_curves.Evaluated(s, 1000 * s, {f"lm-eval/task{k:02d}/acc": k / 100 + s / 1000
                                                        for k in range(20)}, None) for s in (1, 2, 3)]}
    drawn = eval_curves.plot(curves, tmp_path / "curves.png")
    assert len(drawn["plotted"]) == eval_curves.MAX_PANELS == 16
    assert drawn["left_out"] == [f"lm-eval/task{k:02d}/acc" for k in range(16, 20)]
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
