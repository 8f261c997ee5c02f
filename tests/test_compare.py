"""`compare` and the scaling fit: known laws are recovered, runs are read as pretrain writes them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hybrid_megatron.cli import main
from hybrid_megatron.config import load_run_config
from hybrid_megatron.eval import scaling
from tests.run_dirs import write_run

TRUE = {"E": 1.69, "A": 406.4, "alpha": 0.34}  # Chinchilla's N term


def _law(n):
    return TRUE["E"] + TRUE["A"] * np.asarray(n, dtype=np.float64) ** -TRUE["alpha"]


@pytest.mark.parametrize("noise", [0.0, 0.002])
def test_the_fit_recovers_a_known_law_within_5_percent(noise):
    n = np.array([2e6, 5e6, 1.3e7, 3.5e7, 9e7])
    loss = _law(n) + np.random.default_rng(0).normal(0, noise, n.size)
    law = scaling.fit_power_law(n, loss)
    for key in ("E", "A", "alpha"):
        assert getattr(law, key) == pytest.approx(TRUE[key], rel=0.05), (key, law)
    low, high = scaling.bootstrap_alpha(n, loss, samples=200)
    assert low <= law.alpha <= high


def test_the_two_variable_fit_recovers_chinchillas_law_within_5_percent():
    true = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}
    n, d = np.meshgrid([5e6, 2e7, 8e7, 3e8], [2e8, 1e9, 5e9, 2e10])
    n, d = n.ravel(), d.ravel()
    loss = true["E"] + true["A"] * n ** -true["alpha"] + true["B"] * d ** -true["beta"]
    law = scaling.fit_chinchilla(n, d, loss)
    for key, value in true.items():
        assert getattr(law, key) == pytest.approx(value, rel=0.05), (key, law)


def test_a_fit_needs_three_sizes():
    with pytest.raises(ValueError, match="three or more distinct model sizes"):
        scaling.fit_power_law([1e6, 1e6, 2e6], [3.0, 3.0, 2.9])


def _run_dir(root, name, hidden, steps=50, flip=False, extra=()):
    """A run directory following the known law at its parameter count (0.5 above it with ``flip``)."""
    return write_run(root, name, [f"model.hidden_size={hidden}", *extra], lambda n: _law(n) + (0.5 if flip else 0.0),
                     steps)


def test_compare_writes_plots_and_report_and_fits_the_sizes(tmp_path, capsys):
    sizes = {f"h{h}": _run_dir(tmp_path, f"h{h}", h) for h in (256, 384, 512, 768)}
    out = tmp_path / "cmp"
    assert main(["compare", *(str(tmp_path / n) for n in sizes), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["params"] for r in summary["runs"]] == list(sizes.values())
    [family] = summary["families"]  # a width sweep: one family
    assert family["runs"] == list(sizes) and {r["family"] for r in summary["runs"]} == {family["label"]} == {"M-M*-"}
    fit = family["scaling_fit"]
    assert fit["alpha"] == pytest.approx(TRUE["alpha"], rel=0.05) and fit["E"] == pytest.approx(TRUE["E"], rel=0.05)
    assert family["red_flags"] == [] and summary["comparison_flags"] == [] and summary["prediction"] is None
    for png in ("loss_vs_tokens.png", "loss_vs_flops.png", "scaling_fit.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| h256 | `M-M*-` |" in report and "### `M-M*-`" in report and "L(N) = 1.69" in report
    assert "scaling fit [M-M*-]: alpha" in capsys.readouterr().out


def test_runs_that_vary_size_and_tokens_get_the_two_variable_fit(tmp_path):
    from hybrid_megatron.eval.compare import compare

    dirs = []
    for h in (256, 384, 512):
        for steps in (40, 80):
            _run_dir(tmp_path, f"h{h}-s{steps}", h, steps=steps)
            dirs.append(str(tmp_path / f"h{h}-s{steps}"))
    summary = compare(dirs, tmp_path / "out")
    assert summary["families"][0]["scaling_fit_nd"]["runs"] == 6
    assert "L(N, D) = " in (tmp_path / "out" / "report.md").read_text()


def test_the_token_axis_counts_input_tokens_not_loss_tokens(tmp_path):
    """MQAR trains answers only: a step's loss tokens (losses.jsonl "tokens") are a few percent of its input."""
    from hybrid_megatron.eval.compare import compare

    _run_dir(tmp_path, "h256", 256, steps=10, extra=["data.global_batch_tokens=16384"])
    lines = [json.loads(x) for x in (tmp_path / "h256" / "losses.jsonl").read_text().splitlines()]
    with open(tmp_path / "h256" / "losses.jsonl", "w") as f:  # 1,000 answer tokens a step
        f.writelines(json.dumps({**r, "tokens": 1000}) + "\n" for r in lines)
    summary = compare([str(tmp_path / "h256")], tmp_path / "out")
    cfg = load_run_config(tmp_path / "h256" / "config.yaml")
    per_step = (16384 // 1024) // cfg.data.batch_size_multiple * cfg.data.batch_size_multiple * 1024
    assert summary["runs"][0]["tokens"] == 10 * per_step == 10 * 16384


def test_a_larger_model_with_a_higher_loss_is_a_red_flag(tmp_path):
    from hybrid_megatron.eval.compare import compare

    for h, flip in ((256, False), (384, False), (512, True)):
        _run_dir(tmp_path, f"h{h}", h, flip=flip)
    summary = compare([str(tmp_path / f"h{h}") for h in (256, 384, 512)], tmp_path / "out")
    assert any("does not decrease monotonically" in f for f in summary["families"][0]["red_flags"])


def test_a_directory_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path}: no config.yaml (not a run directory written by pretrain)"]


def test_a_damaged_run_directory_is_one_line(tmp_path, capsys):
    """A config.yaml that is not valid YAML or not a resolved config, and log records pretrain would not write."""
    cases = [("config.yaml", "model: [\n", 2, "config.yaml: not valid YAML"),
             ("config.yaml", "data: configs/data/sample.yaml\n", 2,
              "config.yaml: missing required key model (not the resolved config pretrain writes)"),
             ("losses.jsonl", '{"step": 1, "loss": "x", "seq_len": 1024}\n', 3,
              "losses.jsonl:1: not a record pretrain writes (ValueError"),
             ("val.jsonl", '{"loss": 2.0}\n', 3, "val.jsonl:1: not a record pretrain writes (KeyError")]
    for k, (name, text, code, message) in enumerate(cases):
        _run_dir(tmp_path / str(k), "h256", 256)
        run = tmp_path / str(k) / "h256"
        (run / name).write_text(text)
        assert main(["compare", str(run), "--out", str(tmp_path / "o")]) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {run}/{message}"), err


def test_three_sizes_fit_exactly_and_get_no_interval(tmp_path, capsys):
    n = [2e6, 5e6, 1.3e7]
    assert scaling.bootstrap_alpha(n, _law(n)) is None
    for h in (256, 384, 512):
        _run_dir(tmp_path, f"h{h}", h)
    out = tmp_path / "out"
    assert main(["compare", *(str(tmp_path / f"h{h}") for h in (256, 384, 512)), "--out", str(out)]) == 0
    fit = json.loads((out / "summary.json").read_text())["families"][0]["scaling_fit"]
    assert fit["alpha_ci"] is None and "no degrees of freedom" in fit["note"]
    assert "a fourth size gives one" in capsys.readouterr().out
    assert "Three sizes: the law's three constants" in (out / "report.md").read_text()


def test_runs_of_about_one_size_are_compared_without_a_size_fit(tmp_path):
    """Runs of one family within 1.5x of each other in parameters (recipes compared at about one size): a power
    law through them would be fitted to noise."""
    from hybrid_megatron.eval.compare import compare

    for name, hidden in (("a", 256), ("b", 288), ("c", 320)):
        _run_dir(tmp_path, name, hidden, extra=("model.mamba_num_groups=1",))
    summary = compare([str(tmp_path / n) for n in "abc"], tmp_path / "out", predict=7e9)
    assert summary["prediction"]["by_family"] == [] and "no family has a size law" in summary["prediction"]["note"]
    assert "At 7B parameters: no family has a size law" in (tmp_path / "out" / "report.md").read_text()
    [family] = summary["families"]
    assert family["scaling_fit"] is None and family["red_flags"] == []
    assert "under 1.5x" in family["note"] and not (tmp_path / "out" / "scaling_fit.png").exists()
    assert "None fitted: `M-M*-`, no fit: the sizes span" in (tmp_path / "out" / "report.md").read_text()
