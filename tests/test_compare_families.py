"""`compare` groups runs into architecture families and fits a size law per family, then reads the laws at a
larger size: known laws are recovered per family, their crossing and difference at the target come out as
computed by hand, and bad --family / --predict input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipeline.errors import ConfigError
from hybrid_megatron.cli import main
from hybrid_megatron.config import load_run_config
from hybrid_megatron.devtools import REPO_ROOT
from hybrid_megatron.eval import families, scaling, size_fits, size_units
from hybrid_megatron.eval.compare import compare
from tests.run_dirs import write_run

# two families with one exponent, so that their crossing is known in closed form:
# E1 + A1 N^-a = E2 + A2 N^-a  <=>  N = ((A2 - A1) / (E1 - E2))^(1/a)
MAMBA = {"E": 1.69, "A": 406.4, "alpha": 0.34}
ATTENTION = {"E": 1.60, "A": 600.0, "alpha": 0.34}
CROSSING = ((ATTENTION["A"] - MAMBA["A"]) / (MAMBA["E"] - ATTENTION["E"])) ** (1 / 0.34)
WIDTHS = (256, 384, 512, 768)


def _law(p):
    return lambda n: p["E"] + p["A"] * float(n) ** -p["alpha"]


def _model(*overrides):
    return load_run_config(REPO_ROOT / "configs" / "tiny.yaml", ["model.vocab_size=257", *overrides]).model


@pytest.mark.parametrize("pattern, unit", [("M-M*-|M-M*-", "M-M*-"), ("M*-M*-M*-", "M*-"), ("M-M-*", "M-M-*"),
                                           ("MMMM", "M"), ("G-G*-|G-G*-|G-G*-", "G-G*-")])
def test_the_pattern_unit_is_the_shortest_repeated_block(pattern, unit):
    assert families.repeating_unit(pattern) == unit


def test_a_family_is_one_pattern_unit_and_the_same_non_size_fields():
    models = {"h256": _model("model.hidden_size=256"),
              "h512": _model("model.hidden_size=512", "model.ffn_hidden_size=2048", "model.num_attention_heads=8"),
              "deep": _model("model.hybrid_layer_pattern=M-M*-|M-M*-|M-M*-|M-M*-"),  # depth by repeating the unit
              "local": _model("model.layer_spec=local", "model.mamba_chunk_size=64"),  # the same function
              "swiglu": _model("model.activation=swiglu"),
              "attn": _model("model.hybrid_layer_pattern=*-*-|*-*-")}
    grouped = families.group(models)
    assert grouped == {"M-M*- (activation=squared_relu)": ["h256", "h512", "deep", "local"],
                       "M-M*- (activation=swiglu)": ["swiglu"], "*-": ["attn"]}
    shared = _model("model.hybrid_layer_pattern=MEM*E|MEM*E", "model.moe_num_experts=4", "model.moe_shared_expert_size=256")
    wider = _model("model.hybrid_layer_pattern=MEM*E|MEM*E", "model.moe_num_experts=4", "model.moe_shared_expert_size=512")
    plain = _model("model.hybrid_layer_pattern=MEM*E|MEM*E", "model.moe_num_experts=4")
    assert list(families.group({"a": shared, "b": wider, "c": plain})) == [
        "MEM*E (moe_shared_expert_size=True)", "MEM*E (moe_shared_expert_size=False)"]


def test_families_by_hand_override_the_rule_and_bad_ones_are_one_line():
    assert families.parse_assignments(["hybrid=a,b", "hybrid=c", "attn=d"]) == {
        "a": "hybrid", "b": "hybrid", "c": "hybrid", "d": "attn"}
    for bad, message in ((["hybrid"], "expected LABEL=RUN_DIR"), (["=a"], "expected LABEL"),
                         (["x=a,,b"], "an empty run directory"), (["x=a", "y=a"], "a is in two families")):
        with pytest.raises(ConfigError, match=message):
            families.parse_assignments(bad)
    models = {"a": _model(), "b": _model("model.hybrid_layer_pattern=*-*-|*-*-")}
    assert families.group(models, {"a": "mine", "b": "mine"}) == {"mine": ["a", "b"]}
    with pytest.raises(ConfigError, match="not among the runs compared"):
        families.group(models, {"z": "mine"})
    with pytest.raises(ConfigError, match="also the label of runs grouped by their pattern"):
        families.group(models, {"b": "M-M*-"})


def _two_families(root, steps_attention=50):
    dirs = []
    for h in WIDTHS:
        write_run(root, f"m{h}", [f"model.hidden_size={h}"], _law(MAMBA))
        write_run(root, f"a{h}", [f"model.hidden_size={h}", "model.hybrid_layer_pattern=*-*-|*-*-"], _law(ATTENTION),
                  steps=steps_attention)
        dirs += [str(root / f"m{h}"), str(root / f"a{h}")]
    return dirs


def test_each_family_gets_its_own_law_and_the_prediction_reads_them_at_the_target(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *_two_families(tmp_path), "--out", str(out), "--predict", "30B"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    by_label = {f["label"]: f for f in summary["families"]}
    assert list(by_label) == ["M-M*-", "*-"] and by_label["*-"]["runs"] == [f"a{h}" for h in WIDTHS]
    for label, true in (("M-M*-", MAMBA), ("*-", ATTENTION)):
        fit = by_label[label]["scaling_fit"]
        for key in ("E", "A", "alpha"):
            assert fit[key] == pytest.approx(true[key], rel=1e-3), (label, key, fit)
    # one law through both families would fit neither: its residual is far above each family's own
    pooled = scaling.fit_power_law([r["params"] for r in summary["runs"]], [r["final_val_loss"] for r in summary["runs"]])
    assert pooled.sse > 1e-3
    pred = summary["prediction"]
    assert pred["at"] == 3e10 and pred["reference"] == "M-M*-"
    rows = {r["family"]: r for r in pred["by_family"]}
    for label, true in (("M-M*-", MAMBA), ("*-", ATTENTION)):
        assert rows[label]["loss"] == pytest.approx(_law(true)(3e10), abs=1e-3)
        low, high = rows[label]["interval"]
        assert low <= rows[label]["loss"] + 1e-9 and rows[label]["loss"] - 1e-9 <= high
    [diff] = pred["differences"]
    assert diff["difference"] == pytest.approx(_law(ATTENTION)(3e10) - _law(MAMBA)(3e10), abs=1e-3) and diff["difference"] < 0
    assert diff["share_lower"] == 1.0  # noise-free runs: every resample puts attention lower at 30B
    [crossing] = diff["crossings"]
    assert crossing == pytest.approx(CROSSING, rel=0.02)
    text = capsys.readouterr().out
    assert "At 30B parameters:" in text and "- `*-` minus `M-M*-`: -0.0" in text and "the curves cross at 6.3" in text
    report = (out / "report.md").read_text()
    assert "## Prediction" in report and "### `*-`" in report and "| a256 | `*-` |" in report
    assert (out / "scaling_fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_noisy_runs_give_an_interval_that_holds_the_true_value(tmp_path):
    """Five sizes with 0.01 nats of noise: the 95% interval at 7B covers the law the runs were drawn from."""
    rng = np.random.default_rng(3)
    dirs = []
    for h in (256, 384, 512, 768, 1024):
        write_run(tmp_path, f"m{h}", [f"model.hidden_size={h}"], lambda n: _law(MAMBA)(n) + rng.normal(0, 0.01))
        dirs.append(str(tmp_path / f"m{h}"))
    summary = compare(dirs, tmp_path / "out", predict=7e9)
    [row] = summary["prediction"]["by_family"]
    low, high = row["interval"]
    assert low < _law(MAMBA)(7e9) < high and high - low > 0.01
    assert row["extrapolation"] == pytest.approx(7e9 / max(r["params"] for r in summary["runs"]))


def test_the_size_measure_chooses_the_parameters_the_law_is_fitted_to(tmp_path):
    """Runs whose loss follows the law in non-embedding parameters (Kaplan's N) recover it with --size-by
    non-embedding, and not with the total count."""
    dirs = []
    for h in WIDTHS:
        write_run(tmp_path, f"m{h}", [f"model.hidden_size={h}"], _law(MAMBA), size_measure="non-embedding")
        dirs.append(str(tmp_path / f"m{h}"))
    fit = compare(dirs, tmp_path / "ne", size_measure="non-embedding")["families"][0]["scaling_fit"]
    assert fit["alpha"] == pytest.approx(MAMBA["alpha"], rel=1e-3)
    total = compare(dirs, tmp_path / "t")["families"][0]["scaling_fit"]
    assert total["A"] != pytest.approx(MAMBA["A"], rel=0.05), total  # the same losses over larger counts
    runs = compare(dirs, tmp_path / "a", size_measure="active")["runs"]
    assert all(r["params_by_measure"]["active"] == r["params"] > r["params_by_measure"]["non-embedding"] for r in runs)


def test_families_compared_at_equal_compute(tmp_path, capsys):
    """--size-by flops fits each family against its training FLOPs to the last validation; no L(N, D) (C is N
    times D already) and no alpha < 0.1 flag (loss falls far more slowly in compute than in parameters)."""
    out = tmp_path / "cmp"
    assert main(["compare", *_two_families(tmp_path), "--out", str(out), "--size-by", "flops", "--predict", "1e21"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    flops = {r["name"]: r["flops"] for r in summary["runs"]}
    for fam in summary["families"]:
        assert fam["measure"] == "flops" and fam["sizes"] == [flops[n] for n in fam["runs"]]
        assert "training FLOPs" in fam["scaling_fit"]["law"] and fam["scaling_fit_nd"] is None
        assert not any("alpha" in flag for flag in fam["red_flags"])
    assert summary["prediction"]["measure"] == "flops"
    assert "At 1e+21 training FLOPs:" in capsys.readouterr().out


def test_a_comparison_below_hidden_512_or_on_other_token_counts_is_flagged(tmp_path):
    narrow = []
    for h in (128, 192, 256, 384):
        for name, pattern, law in (("m", "M-M*-|M-M*-", MAMBA), ("a", "*-*-|*-*-", ATTENTION)):
            write_run(tmp_path / "narrow", f"{name}{h}", [f"model.hidden_size={h}", "model.num_attention_heads=4",
                                                          f"model.hybrid_layer_pattern={pattern}"], _law(law))
            narrow.append(str(tmp_path / "narrow" / f"{name}{h}"))
    [flag] = compare(narrow, tmp_path / "o1")["comparison_flags"]
    assert "narrower than hidden 512" in flag and "M-M*-, *-" in flag
    flags = compare(_two_families(tmp_path / "tokens", steps_attention=100), tmp_path / "o2")["comparison_flags"]
    assert flags == ["the families were trained on different numbers of tokens (M-M*-: 1.6M-1.6M; *-: 3.3M-3.3M): "
                     "their laws differ in data as well as architecture"]


def test_bad_compare_arguments_are_one_line(tmp_path, capsys):
    dirs = _two_families(tmp_path)
    for args, message in ((["--predict", "seven"], "--predict 'seven': expected a parameter count"),
                          (["--predict", "0.5"], "--predict '0.5': expected a parameter count"),
                          (["--family", "x"], "--family 'x': expected LABEL=RUN_DIR"),
                          (["--family", f"x={tmp_path}/nowhere"], f"--family names {tmp_path}/nowhere, which is not")):
        assert main(["compare", *dirs, "--out", str(tmp_path / "o"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert size_units.parse_size("1.3B") == 1.3e9 and size_units.parse_size("350M") == 3.5e8
    assert size_units.parse_size("7e9") == 7e9 and size_units.count_text(6.34e9) == "6.34B"


def test_families_by_hand_pool_what_the_rule_keeps_apart(tmp_path):
    dirs = _two_families(tmp_path)
    summary = compare(dirs, tmp_path / "o", family_of={d: "everything" for d in dirs})
    [family] = summary["families"]
    assert family["label"] == "everything" and len(family["runs"]) == 8


def test_a_vocabulary_named_and_one_read_from_the_data_are_one_family(tmp_path):
    """tiny's data resolves to 257 tokens: naming 257 and leaving it to the data is the same model; naming
    another vocabulary is another family."""
    write_run(tmp_path, "named")
    write_run(tmp_path, "from_data", ["model.vocab_size=null"])
    write_run(tmp_path, "other", ["model.vocab_size=300"])
    summary = compare([str(tmp_path / n) for n in ("named", "from_data", "other")], tmp_path / "o")
    runs = [sorted(r.rsplit("/", 1)[-1] for r in f["runs"]) for f in summary["families"]]
    assert sorted(runs) == [["from_data", "named"], ["other"]]


def test_runs_without_validation_losses_are_compared_without_a_law(tmp_path):
    for h in WIDTHS:
        write_run(tmp_path, f"m{h}", [f"model.hidden_size={h}"], _law(MAMBA))
        (tmp_path / f"m{h}" / "val.jsonl").unlink()
    summary = compare([str(tmp_path / f"m{h}") for h in WIDTHS], tmp_path / "o", predict=7e9)
    assert summary["families"] == [] and summary["prediction"]["by_family"] == []
    report = (tmp_path / "o" / "report.md").read_text()
    assert "None fitted: no run has a validation loss (val.jsonl)." in report


def _point(name, size, loss, tokens):
    return size_fits.Point(name, size, loss, loss + 0.01, tokens, 512, int(size))


def test_the_size_law_takes_one_data_budget_and_the_backtest_holds_out_the_largest_size():
    """A ladder with lengths (every model at 20, 40 and 100 tokens per parameter), its losses from Chinchilla's
    law: L(N) goes through the 20-tokens-per-parameter runs only; L(N, D) takes them all. The backtest fits
    without the largest size and reads the law there."""
    chinchilla = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}
    sizes = [5e7, 1e8, 2e8, 4e8, 8e8]
    points = [_point(f"n{n:g}-r{r}", n, chinchilla["E"] + chinchilla["A"] * n ** -chinchilla["alpha"]
                     + chinchilla["B"] * (r * n) ** -chinchilla["beta"], int(r * n))
              for n in sizes for r in (20, 40, 100)]
    [fit] = size_fits.fit_families({"h": points})
    assert [p.name for p in fit.law_points] == [f"n{n:g}-r20" for n in sizes]
    summary = fit.summary()
    assert summary["scaling_fit"]["runs"] == 5 and summary["scaling_fit"]["tokens_per_param"] == pytest.approx(20)
    assert "fitted to the 5 runs of one data budget" in summary["scaling_fit"]["subset"]
    nd = summary["scaling_fit_nd"]
    assert nd["runs"] == 15 and nd["alpha"] == pytest.approx(chinchilla["alpha"], rel=0.05)
    test = summary["scaling_fit"]["backtest"]
    law = scaling.fit_power_law(sizes[:-1], [p.final_val for p in fit.law_points][:-1])
    assert test["held_out"] == 8e8 and test["extrapolation"] == 2.0
    assert test["predicted"] == pytest.approx(float(law(8e8)), rel=1e-12)
    assert test["error"] == pytest.approx((test["predicted"] - test["actual"]) / test["actual"], rel=1e-12)
    # a sweep at fixed data (the same tokens for every size) is one budget whatever its tokens per parameter
    fixed = [_point(f"n{n:g}", n, _law(MAMBA)(n), 10**9) for n in sizes]
    [fit] = size_fits.fit_families({"h": fixed})
    assert len(fit.law_points) == 5 and "subset" not in fit.summary()["scaling_fit"]
    assert abs(fit.backtest["error"]) < 1e-6  # an exact law extrapolates exactly


def test_a_largest_run_off_the_law_shows_in_the_backtest(tmp_path, capsys):
    dirs = []
    for h in (256, 384, 512, 768, 1024):
        bump = 0.05 if h == 1024 else 0.0  # the largest run came out worse than the smaller ones' law
        write_run(tmp_path, f"m{h}", [f"model.hidden_size={h}"], lambda n, b=bump: _law(MAMBA)(n) + b)
        dirs.append(str(tmp_path / f"m{h}"))
    assert main(["compare", *dirs, "--out", str(tmp_path / "out")]) == 0
    assert "  backtest: fitted without the largest size, it predicts" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    test = summary["families"][0]["scaling_fit"]["backtest"]
    assert test["predicted"] == pytest.approx(_law(MAMBA)(test["held_out"]), rel=1e-4)
    assert test["error"] == pytest.approx(-0.05 / test["actual"], rel=1e-3)
    assert "Backtest: fitted without the largest size" in (tmp_path / "out" / "report.md").read_text()


def test_a_run_still_training_is_shown_but_kept_out_of_the_size_laws(tmp_path, capsys):
    """Mid-schedule (before its decay and anneal) a run's loss sits above where it will end: fitting it would
    bend the law. It is listed with its step and left out until it finishes."""
    dirs = []
    for h in (256, 384, 512, 768, 1024):
        write_run(tmp_path, f"m{h}", [f"model.hidden_size={h}"], _law(MAMBA))
        dirs.append(str(tmp_path / f"m{h}"))
    losses = tmp_path / "m1024" / "losses.jsonl"
    losses.write_text("".join(losses.read_text().splitlines(keepends=True)[:30]))
    (tmp_path / "m1024" / "val.jsonl").write_text(json.dumps({"step": 30, "loss": 9.0, "tokens": 1}) + "\n")
    assert main(["compare", *dirs, "--out", str(tmp_path / "out")]) == 0
    assert "m1024: step 30 of 50, left out of the size laws until it finishes" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["unfinished"] == [{"name": "m1024", "step": 30, "planned": 50}]
    [family] = summary["families"]
    assert family["runs"] == ["m256", "m384", "m512", "m768"]
    assert family["scaling_fit"]["alpha"] == pytest.approx(MAMBA["alpha"], rel=1e-3)  # the 9.0 did not bend it
    assert next(r for r in summary["runs"] if r["name"] == "m1024")["final_val_loss"] == 9.0  # still shown
    assert "m1024 (step 30 of 50)" in (tmp_path / "out" / "report.md").read_text()


def test_runs_that_differ_in_their_recipe_are_named_where_they_differ(tmp_path):
    """A family whose largest run trained at another LR (its law mixes the LR into the size), and a second family
    without weight decay (the comparison is of that too): each difference named with its runs. Seeds, run
    directories and token budgets are not recipe."""
    dirs = []
    for h in (256, 384, 512, 768):
        write_run(tmp_path, f"m{h}", [f"model.hidden_size={h}", f"train.seed={h}",
                                      *(["optim.lr=1e-3"] if h == 768 else [])], _law(MAMBA))
        write_run(tmp_path, f"a{h}", [f"model.hidden_size={h}", "model.hybrid_layer_pattern=*-*-|*-*-",
                                      "optim.weight_decay=0.0"], _law(ATTENTION))
        dirs += [str(tmp_path / f"m{h}"), str(tmp_path / f"a{h}")]
    summary = compare(dirs, tmp_path / "out")
    by_label = {f["label"]: f for f in summary["families"]}
    assert by_label["M-M*-"]["recipe_differences"] == {"optim.lr": {"0.002": ["m256", "m384", "m512"],
                                                                    "0.001": ["m768"]}}
    assert by_label["*-"]["recipe_differences"] == {}
    assert list(summary["recipe_differences"]) == ["optim.weight_decay"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "- within `M-M*-`: `optim.lr` 0.002 (m256, m384, m512); 0.001 (m768)" in report
    assert "- between the families: `optim.weight_decay` 0.1 (m256, m384, m512, m768); 0.0 (a256" in report


def test_the_compute_optimal_size_is_the_minimum_of_the_family_law_on_its_budget(tmp_path):
    """Runs drawn from Chinchilla's L(N, D) at 6 FLOPs per parameter and token: the closed form's size and tokens
    for a budget are where a brute-force search of the fitted law along k N D = budget finds its minimum, and the
    family's own k is measured from its runs."""
    ch = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}
    points = []
    for n in (5e7, 1e8, 2e8, 4e8, 8e8):
        for r in (10, 20, 50):
            loss = ch["E"] + ch["A"] * n ** -ch["alpha"] + ch["B"] * (r * n) ** -ch["beta"]
            points.append(size_fits.Point(f"n{n:g}-r{r}", n, loss, loss, int(r * n), 1024, int(n), 6.0 * n * r * n))
    [fit] = size_fits.fit_families({"h": points})
    budget = 1e22
    [row] = size_fits.compute_optimal([fit], budget)["by_family"]
    assert row["flops_per_param_token"] == pytest.approx(6.0)
    grid = np.exp(np.linspace(np.log(1e8), np.log(1e11), 20001))
    losses = fit.nd(grid, budget / (6.0 * grid))
    assert row["params"] == pytest.approx(float(grid[np.argmin(losses)]), rel=2e-3)
    assert row["tokens"] == pytest.approx(budget / (6.0 * row["params"]))
    assert row["loss"] == pytest.approx(float(losses.min()), rel=1e-6)
    # the law the runs were drawn from puts the optimum where the fitted one does
    true_n = (ch["alpha"] * ch["A"] / (ch["beta"] * ch["B"])) ** (1 / (ch["alpha"] + ch["beta"])) * (
        budget / 6.0) ** (ch["beta"] / (ch["alpha"] + ch["beta"]))
    assert row["params"] == pytest.approx(true_n, rel=0.1)


def test_a_budget_without_runs_at_two_token_budgets_says_so(tmp_path, capsys):
    assert main(["compare", *_two_families(tmp_path), "--out", str(tmp_path / "o"), "--budget", "1e21"]) == 0
    out = capsys.readouterr().out
    assert "With 1e+21 training FLOPs" in out and "no L(N, D) for `M-M*-`, `*-`: it needs runs at two or more" in out
    assert main(["compare", *_two_families(tmp_path / "b"), "--out", str(tmp_path / "o2"), "--budget", "lots"]) == 2
    assert "--budget 'lots': expected a number of training FLOPs such as 1e23" in capsys.readouterr().err


def test_the_laws_of_one_validation_source(tmp_path, capsys):
    """Code following one law and tests another in every run: --source fits each source's own."""
    dirs = []
    for h in (256, 384, 512, 768):
        n = write_run(tmp_path, f"m{h}", [f"model.hidden_size={h}"], _law(MAMBA))
        code, tests = _law(MAMBA)(n), _law(ATTENTION)(n)
        (tmp_path / f"m{h}" / "val.jsonl").write_text(json.dumps(
            {"step": 50, "tokens": 1000, "loss": (code + tests) / 2, "seconds": 1.0,
             "loss_by_source": {"code_val": code, "tests_val": tests}}) + "\n")
        dirs.append(str(tmp_path / f"m{h}"))
    for source, law in (("code_val", MAMBA), ("tests_val", ATTENTION)):
        fit = compare(dirs, tmp_path / source, source=source)["families"][0]["scaling_fit"]
        assert fit["E"] == pytest.approx(law["E"], rel=1e-3) and fit["alpha"] == pytest.approx(law["alpha"], rel=1e-3)
    assert "loss: the `code_val` validation source's" in (tmp_path / "code_val" / "report.md").read_text()
    assert main(["compare", *dirs, "--out", str(tmp_path / "x"), "--source", "prose"]) == 2
    assert "--source prose: m256 validates on code_val, tests_val" in capsys.readouterr().err
