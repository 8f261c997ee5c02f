"""`hybrid-megatron ladder`: every family at every rung, on target in parameters, its data scaled to the tokens
per parameter, configs that `pretrain` takes and `compare` groups as the spec does; bad specs are one line."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_pipeline.errors import ConfigError
from hybrid_megatron.cli import main
from hybrid_megatron.config import load_run_config
from hybrid_megatron.devtools import REPO_ROOT
from hybrid_megatron.eval import families, ladder, size_units
from hybrid_megatron.model import pattern as pat
from tests.run_dirs import write_config_run

SPEC = {"base": "configs/tiny.yaml",
        "rungs": [{"size": "5M", "layers": 8}, {"size": "10M", "layers": 8}, {"size": "20M", "layers": 12}],
        "families": {"hybrid": {"unit": "M-M*-"}, "attention": {"unit": "*-"},
                     "swiglu-hybrid": {"unit": "M-M*-", "overrides": ["model.activation=swiglu"]}},
        "overrides": ["model.vocab_size=257"], "width_multiple": 64}


def _spec(tmp_path, **changes) -> str:
    path = tmp_path / "ladder.yaml"
    path.write_text(yaml.safe_dump({**SPEC, **changes}, sort_keys=False))
    return str(path)


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the base and its data resolve against the working directory, as in pretrain


def test_every_family_at_every_rung_on_target_with_its_data_scaled(tmp_path):
    spec = ladder.load_spec(_spec(tmp_path))
    runs = ladder.plan(spec, tmp_path / "out")
    base = load_run_config(REPO_ROOT / "configs" / "tiny.yaml")
    base_phases = [p.tokens for p in base.data.phases]
    assert [r.name for r in runs] == [f"{f}-{s}" for f in SPEC["families"] for s in ("5M", "10M", "20M")]
    for r in runs:
        unit = SPEC["families"][r.family]["unit"]
        flat = pat.layers(r.config.model.hybrid_layer_pattern)
        assert families.repeating_unit(flat) == unit and len(flat) % len(unit) == 0
        assert abs(r.params - r.target) / r.target < 0.25, r
        assert r.tokens == round(20 * r.params)
        phases = [p.tokens for p in r.config.data.phases]
        assert abs(sum(phases) - r.tokens) <= len(phases)  # each phase rounded to a token
        assert phases[0] / phases[1] == pytest.approx(base_phases[0] / base_phases[1], rel=1e-6)
        factor = r.tokens / sum(base_phases)
        assert r.config.data.curriculum.total_tokens == pytest.approx(base.data.curriculum.total_tokens * factor, abs=1)
        assert r.config.logging.run_dir == str(tmp_path / "out" / "runs" / r.name)
        assert r.config.checkpoint.save_dir == str(tmp_path / "out" / "runs" / r.name / "checkpoints")
    assert {r.config.model.activation for r in runs if r.family == "swiglu-hybrid"} == {"swiglu"}
    # compare's own rule puts each family's runs together and keeps the families apart
    grouped = families.group({r.name: r.config.model for r in runs})
    assert sorted(map(sorted, grouped.values())) == sorted(sorted(r.name for r in runs if r.family == f)
                                                           for f in SPEC["families"])


def test_the_written_configs_are_what_pretrain_and_compare_take(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["ladder", _spec(tmp_path), "--out", str(out)]) == 0
    summary = json.loads((out / "ladder.json").read_text())
    assert len(summary["runs"]) == 9 and "| hybrid-10M |" in (out / "ladder.md").read_text()
    assert f"--family hybrid={out}/runs/hybrid-5M,{out}/runs/hybrid-10M,{out}/runs/hybrid-20M" in summary[
        "compare_explicit"]
    assert summary["compare"] == f"hybrid-megatron compare --ladder {out}" and summary["predict"] == 7e9
    row = summary["runs"][4]
    cfg = load_run_config(row["config"])
    assert cfg.model.hidden_size == row["hidden_size"] and cfg.model.hybrid_layer_pattern == row["pattern"]
    capsys.readouterr()
    assert main(["pretrain", row["config"], "--dry-run"]) == 0  # the dry run counts what the ladder counted
    assert f"{row['params']:,}" in capsys.readouterr().out
    assert main(["ladder", _spec(tmp_path), "--out", str(out)]) == 2  # a plan is not replaced by accident
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["ladder", _spec(tmp_path), "--out", str(out), "--overwrite"]) == 0
    assert all(0 < r["peak_gib"] < 80 and not r["over_memory"] for r in summary["runs"])
    capsys.readouterr()
    assert main(["ladder", _spec(tmp_path, gpu_memory_gib=0.001), "--out", str(out), "--overwrite"]) == 0
    assert "warning: 9 run(s) above 0.001 GiB per GPU" in capsys.readouterr().out
    assert "GiB **over** |" in (out / "ladder.md").read_text()


def test_the_example_ladder_plans_every_run_near_its_target(tmp_path):
    runs = ladder.plan(ladder.load_spec("configs/ladders/hybrid_families.yaml"), tmp_path)
    assert {r.family for r in runs} == {"mamba2-hybrid", "gdn-hybrid", "attention"} and len(runs) == 12
    for r in runs:
        assert abs(r.params - r.target) / r.target < 0.1, (r.name, r.params)


@pytest.mark.parametrize("changes, message", [
    ({"families": {"h": {"unit": "M-|M-"}}}, "families.h.unit='M-|M-': a unit has no '|' cuts"),
    ({"families": {"h": {"unit": "MX"}}}, "unknown symbol 'X'"),
    ({"families": {"a b": {"unit": "M-"}}}, "families.a b: a family name is letters"),
    ({"rungs": [{"size": "big", "layers": 4}]}, "rungs[0].size 'big': expected a parameter count"),
    ({"rungs": [{"size": "5M", "layers": 0}]}, "rungs[0].layers=0: must be >= 1"),
    ({"rungs": [{"size": "10T", "layers": 8}]}, "hybrid-10T (unit 'M-M*-', 8 layers): the nearest valid config has"),
    ({"tokens_per_param": 0}, "tokens_per_param must be > 0"),
    ({"rungs": [{"size": "5M", "layers": 8, "gpus": 0}]}, "rungs[0].gpus=0: must be >= 1"),
    ({"colour": "blue"}, "unknown config key colour"),
    ({"base": "configs/none.yaml"}, "config file not found: configs/none.yaml"),
])
def test_bad_specs_are_one_line(tmp_path, capsys, changes, message):
    assert main(["ladder", _spec(tmp_path, **changes), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_without_a_vocabulary_the_ladder_says_where_to_set_it(tmp_path):
    spec = ladder.load_spec(_spec(tmp_path, overrides=[], base=str(tmp_path / "base.yaml")))
    raw = yaml.safe_load((REPO_ROOT / "configs" / "tiny.yaml").read_text())
    raw["data"] = {**yaml.safe_load((REPO_ROOT / "configs" / "data" / "sample.yaml").read_text()),
                   "sources": {"code": str(tmp_path / "none")}}
    raw["data"]["phases"] = [{"name": "pretrain", "tokens": 1000000, "weights": {"code": 1.0}}]
    raw.pop("build_sample_data", None)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="set model.vocab_size in its overrides, or prepare the base's data first"):
        ladder.plan(spec, tmp_path / "out")


def test_with_lengths_the_large_runs_flops_are_the_budget_compare_optimises_for(tmp_path):
    rungs = [*SPEC["rungs"], {"size": "60M", "layers": 16, "base": "configs/tiny.yaml", "tokens_per_param": 50}]
    out = tmp_path / "out"
    assert main(["ladder", _spec(tmp_path, rungs=rungs, lengths=[1, 2]), "--out", str(out)]) == 0
    plan = json.loads((out / "ladder.json").read_text())
    large = [r for r in plan["runs"] if "-60M-" in r["run"]]
    assert plan["budget"] == max(r["training_flops"] for r in large) and f"--budget {plan['budget']:.3g}" in plan[
        "compare_explicit"]
    assert ladder.read_plan(out)["budget"] == plan["budget"]


def test_lengths_and_seeds_make_a_run_of_each(tmp_path):
    spec = ladder.load_spec(_spec(tmp_path, lengths=[1, 2.5], seeds=[7, 8], families={"hybrid": {"unit": "M-M*-"}},
                                  rungs=[{"size": "5M", "layers": 8}]))
    runs = ladder.plan(spec, tmp_path / "out")
    assert [r.name for r in runs] == ["hybrid-5M-1xC-s7", "hybrid-5M-1xC-s8", "hybrid-5M-2.5xC-s7", "hybrid-5M-2.5xC-s8"]
    assert len({r.config.model.hidden_size for r in runs}) == 1 and len({r.params for r in runs}) == 1
    assert [r.tokens for r in runs] == [round(20 * runs[0].params)] * 2 + [round(50 * runs[0].params)] * 2
    assert [(r.config.train.seed, r.config.data.seed) for r in runs] == [(7, 7), (8, 8), (7, 7), (8, 8)]
    for bad, message in (({"lengths": [1, 1]}, "distinct multiples"), ({"lengths": [0]}, "distinct multiples"),
                         ({"seeds": [1, 1]}, "each seed once")):
        with pytest.raises(ConfigError, match=message):
            ladder.load_spec(_spec(tmp_path, **bad))


def test_a_ladder_trained_then_compared_gives_each_family_its_law(tmp_path, capsys):
    """The planned runs, their losses following a known law per family (plus a seed's noise), compared with
    the line ladder.md gives: the spec's family names, each law recovered, the seeds as replicates."""
    laws = {"hybrid": (1.69, 406.4, 0.34), "attention": (1.60, 600.0, 0.34)}
    rungs = [{"size": s, "layers": 8} for s in ("4M", "8M", "16M", "32M")]
    out = tmp_path / "out"
    assert main(["ladder", _spec(tmp_path, families={"hybrid": {"unit": "M-M*-"}, "attention": {"unit": "*-"}},
                                 rungs=rungs, seeds=[0, 1]), "--out", str(out)]) == 0
    plan = json.loads((out / "ladder.json").read_text())
    noise = np.random.default_rng(0).normal(0, 0.003, len(plan["runs"]))
    for row, jitter in zip(plan["runs"], noise):
        e, a, alpha = laws[row["family"]]
        write_config_run(out / "runs" / row["run"], load_run_config(row["config"]), e + a * row["params"] ** -alpha + jitter)
    line = shlex.split(plan["compare_explicit"].replace(f"{out}/runs/*", " ".join(r["run_dir"] for r in plan["runs"])))
    assert line[:2] == ["hybrid-megatron", "compare"]
    capsys.readouterr()
    assert main(line[1:]) == 0
    summary = json.loads((out / "compare" / "summary.json").read_text())
    by_label = {f["label"]: f for f in summary["families"]}
    assert list(by_label) == ["hybrid", "attention"]
    for label, (e, a, alpha) in laws.items():
        fit = by_label[label]["scaling_fit"]
        assert fit["alpha"] == pytest.approx(alpha, rel=0.2) and fit["E"] == pytest.approx(e, abs=0.05)
        assert [len(r["runs"]) for r in by_label[label]["replicates"]] == [2, 2, 2, 2]
    assert summary["prediction"]["at"] == 7e9 and len(summary["prediction"]["differences"]) == 1
    assert "(other seeds)" in (out / "compare" / "report.md").read_text()
    # while the ladder trains: the runs not started yet are left out and listed, the rest compared
    (out / "runs" / "attention-32M-s1" / "losses.jsonl").write_text("")
    for name in ("attention-16M-s0", "attention-16M-s1"):
        for f in (out / "runs" / name).iterdir():
            f.unlink()
    capsys.readouterr()
    assert main(line[1:]) == 0
    assert "not started yet, left out: " in capsys.readouterr().out
    summary = json.loads((out / "compare" / "summary.json").read_text())
    assert sorted(Path(d).name for d in summary["not_started"]) == ["attention-16M-s0", "attention-16M-s1",
                                                                     "attention-32M-s1"]
    assert len(summary["runs"]) == len(plan["runs"]) - 3
    assert main([x for x in line[1:] if x != "--partial"]) == 2  # without --partial: the first one stops it
    assert "attention-16M-s0: no config.yaml (not a run directory written by pretrain)" in capsys.readouterr().err
    # `compare --ladder DIR` is that line, read from the plan
    assert main(["compare", "--ladder", str(out), "--out", str(out / "again")]) == 0
    again = json.loads((out / "again" / "summary.json").read_text())
    assert again["families"] == summary["families"] and again["prediction"] == summary["prediction"]
    assert again["not_started"] == summary["not_started"]
    assert main(["compare", "--ladder", str(out)]) == 0 and (out / "compare" / "report.md").is_file()
    for args, code, message in ((["--ladder", str(out), row["run_dir"]], 2, "--ladder takes its runs and families"),
                                ([], 2, "pass run directories and --out DIR, or --ladder DIR"),
                                (["--ladder", str(tmp_path)], 2, "no ladder.json (plan the ladder there first"),):
        capsys.readouterr()
        assert main(["compare", *args]) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    (out / "ladder.json").write_text('{"runs": [{"run": 1}]}')
    assert main(["compare", "--ladder", str(out)]) == 3
    assert "ladder.json: not the plan `ladder` writes (KeyError" in capsys.readouterr().err


def test_a_rung_on_a_base_of_its_own_plans_the_large_run_in_its_pipeline_segments(tmp_path):
    """The large run planned with each family's unit on its own recipe: here a base pipelined over two stages,
    so the unit's repeats split into two equal segments, the rung's own tokens per parameter, at least TP x PP
    GPUs; the compare line reads the laws at its size."""
    big = yaml.safe_load((REPO_ROOT / "configs" / "tiny.yaml").read_text())
    big["parallel"] = {**big.get("parallel", {}), "pipeline_model_parallel_size": 2}
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(big))
    rungs = [*SPEC["rungs"], {"size": "60M", "layers": 16, "base": str(tmp_path / "big.yaml"), "tokens_per_param": 50}]
    out = tmp_path / "out"
    assert main(["ladder", _spec(tmp_path, rungs=rungs), "--out", str(out)]) == 0
    plan = json.loads((out / "ladder.json").read_text())
    large = [r for r in plan["runs"] if r["run"].endswith("-60M")]
    assert len(large) == 3
    for row in large:
        first, second = row["pattern"].split("|")
        assert first == second and row["gpus"] == 2
        assert row["tokens"] == round(50 * row["params"])
        assert load_run_config(row["config"]).parallel.pipeline_model_parallel_size == 2
    assert plan["predict"] == max(r["params"] for r in large) and plan["budget"] is None  # one length: no L(N, D)
    assert f"--predict {size_units.count_text(plan['predict'])} " in plan["compare_explicit"]
    small = [r for r in plan["runs"] if not r["run"].endswith("-60M")]
    assert all("|" not in r["pattern"] and r["gpus"] == 1 for r in small)


def test_the_learning_rate_follows_a_power_of_the_size(tmp_path):
    spec = ladder.load_spec(_spec(tmp_path, lr_scaling={"reference": "10M", "exponent": -0.5}))
    base = load_run_config(REPO_ROOT / "configs" / "tiny.yaml").optim
    for r in ladder.plan(spec, tmp_path / "out"):
        factor = (r.params / 1e7) ** -0.5
        assert r.config.optim.lr == pytest.approx(base.lr * factor) and r.config.optim.min_lr == pytest.approx(
            base.min_lr * factor)
    for bad, message in (({"lr_scaling": {"reference": "10M", "exponent": 0.5}}, "lr_scaling.exponent=0.5"),
                         ({"lr_scaling": {"reference": "x", "exponent": -0.3}}, "lr_scaling.reference 'x'"),
                         ({"lr_scaling": {"reference": "1B", "exponent": -0.3}, "overrides": ["optim.lr=1e-3"]},
                          "lr_scaling and the override 'optim.lr=1e-3' both set the learning rate")):
        with pytest.raises(ConfigError, match=message):
            ladder.load_spec(_spec(tmp_path, **bad))
