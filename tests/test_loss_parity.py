"""CPU checks of tools/loss_parity.py: every planned run is a valid config, and the comparison judges right.

The runs themselves need GPUs; here the suites' configs are built and validated the way `pretrain`
does it, and the comparison runs on loss records written the way the training loop writes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.schedule import build_schedule
from hybrid_megatron.checkpoint.layout import step_dir_name
from hybrid_megatron.config import load_run_config
from hybrid_megatron.devtools import REPO_ROOT as ROOT
from hybrid_megatron.devtools import parity_suites as PS
from hybrid_megatron.model.memory import data_parallel_size
from hybrid_megatron.model.pattern import layers, split_stages
from hybrid_megatron.training.step import micro_batch_plan
from tools import loss_parity as L

RUNS = [(suite, run) for suite in L.SUITES.values() for run in suite.runs]


@pytest.mark.parametrize("suite,run", RUNS, ids=[f"{s.name}:{r.name}" for s, r in RUNS])
def test_every_planned_run_is_a_valid_config(suite, run, tmp_path):
    overrides = L.run_overrides(suite, run, suite.default_steps, tmp_path)
    cfg = load_run_config(ROOT / suite.config, overrides)
    assert data_parallel_size(cfg, run.gpus) >= 1
    micro_batch_plan(cfg, build_schedule(cfg.data), data_parallel_size(cfg, run.gpus))  # every step splits
    split_stages(cfg.model.hybrid_layer_pattern, cfg.parallel.pipeline_model_parallel_size)
    assert cfg.train.train_steps == suite.default_steps
    assert cfg.logging.run_dir == str(tmp_path / run.name)
    if run.reference:
        assert run.reference in {r.name for r in suite.runs}


def test_parallel_suite_covers_the_layouts_recompute_and_cross_layout_resume(tmp_path):
    suite = L.SUITES["parallel"]
    cfgs = {r.name: load_run_config(ROOT / suite.config, L.run_overrides(suite, r, 60, tmp_path)) for r in suite.runs}
    layouts = {(c.parallel.tensor_model_parallel_size, c.parallel.pipeline_model_parallel_size,
                data_parallel_size(c, r.gpus), c.parallel.sequence_parallel, c.train.recompute)
               for r, c in zip(suite.runs, cfgs.values())}
    for tp, pp, dp, sp in ((2, 1, 1, True), (1, 2, 1, False), (1, 1, 2, False)):
        for rc in ("none", "selective", "full"):
            assert (tp, pp, dp, sp, rc) in layouts
    stages = split_stages(cfgs["pp2"].model.hybrid_layer_pattern, 2)
    assert [len(s.chunks[0]) for s in stages] == [7, 3]  # uneven on purpose
    interleaved = split_stages(cfgs["pp2-vpp2"].model.hybrid_layer_pattern, 2)
    assert [len(s.chunks) for s in interleaved] == [2, 2]
    assert layers(cfgs["pp2-vpp2"].model.hybrid_layer_pattern) == layers(cfgs["tp1"].model.hybrid_layer_pattern)
    assert all(c.train.deterministic for c in cfgs.values())
    # the resume runs start from tp2-sp's half-way checkpoint, at another layout, for a few steps
    for name, (tp, pp) in {"tp2-sp>pp2": (1, 2), "tp2-sp>tp1": (1, 1)}.items():
        c = cfgs[name]
        assert Path(c.checkpoint.load) == tmp_path / "tp2-sp" / "checkpoints" / step_dir_name(30)
        assert (c.parallel.tensor_model_parallel_size, c.parallel.pipeline_model_parallel_size) == (tp, pp)
        assert c.train.exit_after_steps == 5
    assert cfgs["tp2-sp"].checkpoint.save_interval == 30  # the resume source saves half-way
    assert cfgs["tp1"].checkpoint.save_interval is None  # nothing reads its later weights
    assert not any(c.checkpoint.save_final for c in cfgs.values())  # no optimizer-state write at the end
    # every other layout starts from tp1's initial weights (megatron's own init differs per TP/PP rank)
    assert cfgs["tp1"].checkpoint.save_initial and cfgs["tp1"].checkpoint.load is None
    for name in ("tp2-sp", "pp2", "dp2", "tp2-sp-full", "pp2-selective", "dp2-full"):
        assert Path(cfgs[name].checkpoint.load) == tmp_path / "tp1" / "checkpoints" / step_dir_name(0)


def test_families_suite_runs_each_family_at_every_layout_from_its_own_initial_weights(tmp_path):
    suite = L.SUITES["families"]
    cfgs = {r.name: (r, load_run_config(ROOT / suite.config, L.run_overrides(suite, r, 60, tmp_path))) for r in suite.runs}
    symbols = {"gdn": "G", "moe": "E", "swa": "*"}
    for family, symbol in symbols.items():
        base_run, base = cfgs[f"{family}-1"]
        assert base_run.gpus == 1 and base.checkpoint.save_initial and symbol in base.model.hybrid_layer_pattern
        expected = {"tp2-sp": (2, 1, 1, 1), "pp2": (1, 2, 1, 1), "dp2": (1, 1, 2, 1)}
        if family == "moe":
            expected["ep2"] = (1, 1, 2, 2)
        for layout, (tp, pp, dp, ep) in expected.items():
            run, c = cfgs[f"{family}-{layout}"]
            par = c.parallel
            assert (par.tensor_model_parallel_size, par.pipeline_model_parallel_size, data_parallel_size(c, run.gpus),
                    par.expert_model_parallel_size) == (tp, pp, dp, ep)
            assert run.reference == f"{family}-1" and c.model == base.model and c.train.deterministic
            assert Path(c.checkpoint.load) == tmp_path / f"{family}-1" / "checkpoints" / step_dir_name(0)
        assert [len(s.chunks[0]) for s in split_stages(base.model.hybrid_layer_pattern, 2)] == [7, 3]
    assert cfgs["swa-1"][1].model.attention_window == 256 and cfgs["swa-1"][1].model.global_attention_layers == [1]
    assert len(suite.runs) == 3 * 4 + 1


def test_cp_suite_compares_both_mamba_cp_modes_and_packed_documents_with_cp1(tmp_path):
    suite = L.SUITES["cp"]
    runs = {r.name: (r, load_run_config(ROOT / suite.config, L.run_overrides(suite, r, 60, tmp_path))) for r in suite.runs}
    assert runs["cp1"][1].parallel.context_parallel_size == 1 and runs["cp1"][1].checkpoint.save_initial
    modes = {}
    for name in ("cp2-all-to-all", "cp2-state-passing"):
        run, c = runs[name]
        assert c.parallel.context_parallel_size == 2 and data_parallel_size(c, run.gpus) == 1
        assert run.reference == "cp1" and Path(c.checkpoint.load) == tmp_path / "cp1" / "checkpoints" / step_dir_name(0)
        assert not c.data.reset_at_document_boundaries
        modes[name] = c.parallel.mamba_context_parallel
    assert modes == {"cp2-all-to-all": "all_to_all", "cp2-state-passing": "state_passing"}
    base = runs["cp1-packed"][1]
    assert base.data.reset_at_document_boundaries and base.data.document_multiple == 16 and base.checkpoint.save_initial
    for mode in ("all_to_all", "state_passing"):
        run, packed = runs[f"cp2-packed-{mode.replace('_', '-')}"]
        assert packed.data == base.data and packed.parallel.context_parallel_size == 2  # the same padded rows
        assert packed.parallel.mamba_context_parallel == mode and run.reference == "cp1-packed"
        assert Path(packed.checkpoint.load) == tmp_path / "cp1-packed" / "checkpoints" / step_dir_name(0)


def test_fp8_suite_compares_recipes_with_bf16_after_warmup(tmp_path):
    suite = L.SUITES["fp8"]
    cfgs = {r.name: load_run_config(ROOT / suite.config, L.run_overrides(suite, r, 300, tmp_path)) for r in suite.runs}
    assert cfgs["bf16"].precision.fp8 is None and cfgs["bf16-repeat"].precision.fp8 is None
    assert cfgs["fp8-tensorwise"].precision.fp8_recipe == "tensorwise"
    assert cfgs["fp8-delayed"].precision.fp8_recipe == "delayed"
    ends = cfgs["fp8-tensorwise-bf16ends"].precision
    assert (ends.fp8_bf16_layers_at_start, ends.fp8_bf16_layers_at_end) == (2, 2)
    assert cfgs["fp8-tensorwise-mamba-bf16"].precision.fp8_mamba_projections_bf16
    assert PS.FP8_WARMUP == cfgs["bf16"].schedule.lr_warmup_steps
    for run in suite.runs[1:]:
        assert (run.reference, run.rel_tol, run.after_step, run.window) == ("bf16", 0.015, PS.FP8_WARMUP, 10)
    assert all(c.logging.log_interval == PS.FP8_LOG_INTERVAL for c in cfgs.values())
    assert all(c.data.global_batch_tokens == 16384 for c in cfgs.values())


def test_the_64k_fp8_suite_is_the_fp8_suite_at_four_times_the_tokens(tmp_path):
    small, large = L.SUITES["fp8"], L.SUITES["fp8-64k"]
    assert large.runs == small.runs and large.spread_run == small.spread_run == "bf16-repeat"
    for run in large.runs:
        a = load_run_config(ROOT / small.config, L.run_overrides(small, run, 300, tmp_path))
        b = load_run_config(ROOT / large.config, L.run_overrides(large, run, 300, tmp_path))
        assert b.data.global_batch_tokens == 4 * a.data.global_batch_tokens
        assert (b.precision, b.data.seq_len, b.schedule, b.optim) == (a.precision, a.data.seq_len, a.schedule, a.optim)
        assert b.train.micro_batch_size == 4


# ---- the comparison ------------------------------------------------------------------------------


def _records(steps, loss=lambda s: 5.0 - 0.01 * s, tokens=600, t0=100.0, dt=0.5):
    """Records as losses.jsonl has them: 1000 input tokens a step, of which ``tokens`` were trained (loss tokens)."""
    return [{"step": s, "loss": loss(s), "tokens": tokens, "input_tokens": 1000, "time": t0 + dt * s} for s in steps]


def _ok(records):
    return {"status": "ok", "losses": records}


def test_a_run_its_time_limit_stopped_after_the_last_step_is_compared_and_flagged():
    base, run = L.Run("a", 1, ()), L.Run("b", 1, (), reference="a")
    stopped = {"status": "failed", "exit": 124, "losses": _records(range(1, 11))}
    row = L.compare_run(run, 10, {"a": _ok(_records(range(1, 11))), "b": stopped})
    assert row["verdict"] == "pass" and "time limit after its last step" in row["note"]
    assert "(exit 124: stopped by its time limit" in L.format_table([row])
    assert L.compare_run(base, 10, {"a": stopped})["verdict"] == "baseline"
    assert L.compare_run(run, 10, {"a": stopped, "b": _ok(_records(range(1, 11)))})["verdict"] == "pass"
    # stopped before its last step, or failed otherwise: not compared
    early = {"status": "failed", "exit": 124, "losses": _records(range(1, 10))}
    crashed = {"status": "failed", "exit": 1, "losses": _records(range(1, 11))}
    for bad in (early, crashed):
        assert L.compare_run(run, 10, {"a": _ok(_records(range(1, 11))), "b": bad})["verdict"] == "failed"
        assert L.compare_run(run, 10, {"a": bad, "b": _ok(_records(range(1, 11)))})["verdict"] == "no reference"


def test_identical_curves_pass_bitwise():
    base, run = L.Run("a", 1, ()), L.Run("b", 2, (), reference="a")
    results = {"a": _ok(_records(range(1, 11))), "b": _ok(_records(range(1, 11)))}
    assert L.compare_run(base, 10, results)["verdict"] == "baseline"
    row = L.compare_run(run, 10, results)
    assert row["verdict"] == "pass" and row["bitwise"] and row["max_rel_diff"] == 0
    assert row["tokens_per_s"] == pytest.approx(1000 / 0.5)  # input tokens, not the 600 loss tokens


def test_one_step_past_the_tolerance_fails_and_is_named():
    run = L.Run("b", 2, (), reference="a", rel_tol=0.01)
    bumped = _records(range(1, 11), loss=lambda s: (5.0 - 0.01 * s) * (1.02 if s == 7 else 1.0))
    row = L.compare_run(run, 10, {"a": _ok(_records(range(1, 11))), "b": _ok(bumped)})
    assert row["verdict"] == "FAIL" and row["worst_step"] == 7 and row["max_rel_diff"] == pytest.approx(0.02)
    within = _records(range(1, 11), loss=lambda s: (5.0 - 0.01 * s) * 1.005)
    row = L.compare_run(run, 10, {"a": _ok(_records(range(1, 11))), "b": _ok(within)})
    assert row["verdict"] == "pass" and not row["bitwise"]


def test_mean_diff_tells_a_drift_from_noise():
    run = L.Run("b", 2, (), reference="a", rel_tol=0.05)
    ref = _ok(_records(range(1, 11)))
    drift = _records(range(1, 11), loss=lambda s: (5.0 - 0.01 * s) * 1.01)
    noise = _records(range(1, 11), loss=lambda s: (5.0 - 0.01 * s) * (1.02 if s % 2 else 0.98))
    assert L.compare_run(run, 10, {"a": ref, "b": _ok(drift)})["mean_rel_diff"] == pytest.approx(0.01)
    row = L.compare_run(run, 10, {"a": ref, "b": _ok(noise)})
    assert row["mean_rel_diff"] == pytest.approx(0.0, abs=1e-12) and row["max_rel_diff"] == pytest.approx(0.02)


def test_a_windowed_run_is_judged_on_its_logged_means():
    run = L.Run("fp8", 1, (), reference="bf16", rel_tol=0.015, after_step=10, window=10)
    ref = _ok(_records(range(1, 31)))
    spike = _records(range(1, 31), loss=lambda s: (5.0 - 0.01 * s) * (1.03 if s == 15 else 1.0))
    row = L.compare_run(run, 30, {"bf16": ref, "fp8": _ok(spike)})
    assert row["verdict"] == "pass" and row["compared_steps"] == [20, 30]
    assert row["max_step_rel_diff"] == pytest.approx(0.03) and row["max_rel_diff"] == pytest.approx(0.003, rel=0.05)
    offset = _records(range(1, 31), loss=lambda s: (5.0 - 0.01 * s) * (1.02 if 21 <= s <= 30 else 1.0))
    row = L.compare_run(run, 30, {"bf16": ref, "fp8": _ok(offset)})
    assert row["verdict"] == "FAIL" and row["worst_step"] == 30 and row["max_rel_diff"] == pytest.approx(0.02)


def test_runs_are_read_against_the_baselines_repeat():
    """A suite with a spread run: every other run compared with the same baseline says whether its
    largest distance lies within the repeat's; the verdicts stay the tolerance's."""
    suite = L.Suite("s", "configs/tiny.yaml", (), (
        L.Run("base", 1, ()),
        L.Run("repeat", 1, (), reference="base", rel_tol=0.015),
        L.Run("close", 1, (), reference="base", rel_tol=0.015),
        L.Run("far", 1, (), reference="base", rel_tol=0.015),
    ), default_steps=10, spread_run="repeat")
    steps = range(1, 11)

    def bumped(size):
        return _ok(_records(steps, loss=lambda s: (5.0 - 0.01 * s) * (1 + size if s in (4, 8) else 1.0)))

    results = {"base": _ok(_records(steps)), "repeat": bumped(0.03), "close": bumped(0.02), "far": bumped(0.04)}
    rows = {r["run"]: r for r in L.compare_suite(suite, 10, results)}
    assert rows["close"]["verdict"] == rows["far"]["verdict"] == rows["repeat"]["verdict"] == "FAIL"
    assert rows["close"]["over_tol"] == [2, 10] and rows["close"]["within_spread"] is True
    assert rows["far"]["within_spread"] is False
    assert rows["far"]["spread_max_rel_diff"] == pytest.approx(0.03)
    assert "within_spread" not in rows["repeat"] and "within_spread" not in rows["base"]
    table = L.format_table(list(rows.values()))
    assert "2/10" in table and "(within the baseline's repeat (3.00e-02))" in table
    assert "(beyond the baseline's repeat" in table
    del results["repeat"]  # no repeat run: nothing to read against
    assert not any("within_spread" in r for r in L.compare_suite(suite, 10, results))


def test_missing_repeated_steps_or_other_data_fail():
    run = L.Run("b", 2, (), reference="a")
    ref = _ok(_records(range(1, 11)))
    missing = _records([s for s in range(1, 11) if s != 4])
    assert L.compare_run(run, 10, {"a": ref, "b": _ok(missing)})["missing_steps"] == [4]
    assert L.compare_run(run, 10, {"a": ref, "b": _ok(missing)})["verdict"] == "FAIL"
    repeated = _records(range(1, 11)) + _records([5, 6])
    row = L.compare_run(run, 10, {"a": ref, "b": _ok(repeated)})
    assert row["repeated_steps"] == 2 and row["verdict"] == "FAIL"
    other_data = _ok(_records(range(1, 11), tokens=999))
    row = L.compare_run(run, 10, {"a": ref, "b": other_data})
    assert not row["same_tokens"] and row["verdict"] == "FAIL"


def test_warmup_steps_are_not_compared():
    run = L.Run("fp8", 1, (), reference="bf16", rel_tol=0.015, after_step=3)
    early_gap = _records(range(1, 11), loss=lambda s: (5.0 - 0.01 * s) * (1.5 if s <= 3 else 1.0))
    row = L.compare_run(run, 10, {"bf16": _ok(_records(range(1, 11))), "fp8": _ok(early_gap)})
    assert row["verdict"] == "pass" and row["compared_steps"] == [4, 10]


def test_a_resume_run_is_compared_on_the_steps_after_the_checkpoint():
    run = L.Run("x>y", 1, (), reference="x", resume_from="x", resume_steps=5)
    assert L.expected_steps(run, 60) == [31, 32, 33, 34, 35]
    results = {"x": _ok(_records(range(1, 61))), "x>y": _ok(_records(range(31, 36)))}
    row = L.compare_run(run, 60, results)
    assert row["verdict"] == "pass" and row["compared_steps"] == [31, 35] and row["first_step_rel_diff"] == 0
    results["x>y"] = _ok(_records(range(30, 36)))  # a step before the checkpoint was trained again
    assert L.compare_run(run, 60, results)["extra_steps"] == [30]


def test_failed_or_absent_runs_and_references():
    run = L.Run("b", 2, (), reference="a")
    assert L.compare_run(run, 10, {})["verdict"] == "not run"
    assert L.compare_run(run, 10, {"b": {"status": "failed", "losses": []}})["verdict"] == "failed"
    assert L.compare_run(run, 10, {"b": _ok(_records(range(1, 11)))})["verdict"] == "no reference"
    assert L.compare_run(L.Run("a", 1, ()), 10, {"a": _ok(_records(range(1, 9)))})["verdict"] == "incomplete"


# ---- the command line ----------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "loss_parity.py"), *args], capture_output=True,
                          text=True, cwd=ROOT)


def _runs_file(path: Path, runs: dict, steps: int = 20) -> Path:
    path.write_text(json.dumps({"suite": "fp8", "steps": steps, "runs": runs}))
    return path


def test_plan_lists_the_commands_and_bad_names_exit_2():
    proc = _cli("plan", "parallel")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["name"] for r in rows] == [r.name for r in L.SUITES["parallel"].runs]
    two = next(r for r in rows if r["name"] == "tp2-sp")
    assert "--nproc-per-node=2" in two["command"] and "configs/tiny.yaml" in two["command"]
    proc = _cli("plan", "parallel", "--runs", "tp1,tp9")
    assert proc.returncode == 2 and "unknown ['tp9']" in proc.stderr


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_plan_into_a_reader_that_left_ends_without_a_traceback(unbuffered):
    """`plan fp8 | head -1` and a reader gone before the first line: no BrokenPipeError traceback
    (line by line with PYTHONUNBUFFERED, else in one flush at the end)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    cmd = f"'{sys.executable}' '{ROOT / 'tools' / 'loss_parity.py'}' plan fp8"
    head = subprocess.run(f"{cmd} | head -1", shell=True, capture_output=True, text=True, timeout=120, env=env)
    assert len(head.stdout.splitlines()) == 1 and json.loads(head.stdout)["name"] == "bf16"
    gone = subprocess.run(f"{cmd} | true", shell=True, capture_output=True, text=True, timeout=120, env=env)
    for proc in (head, gone):
        assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_compare_merges_files_later_wins_and_sets_the_exit_code(tmp_path):
    good = _records(range(1, 21))  # the fp8 suite compares after its 10 warm-up steps
    first = _runs_file(tmp_path / "a.json", {"bf16": _ok(good), "fp8-tensorwise": _ok(_records(
        range(1, 21), loss=lambda s: (5.0 - 0.01 * s) * 1.05))})
    second = _runs_file(tmp_path / "b.json", {"fp8-tensorwise": _ok(good)})
    proc = _cli("compare", "fp8", str(first), "--out", str(tmp_path / "o1"))
    assert proc.returncode == 1 and "FAIL" in proc.stdout
    proc = _cli("compare", "fp8", str(first), str(second), "--out", str(tmp_path / "o2"))
    assert proc.returncode == 0, proc.stdout
    rows = {r["run"]: r for r in json.loads((tmp_path / "o2" / "fp8_parity.json").read_text())["rows"]}
    assert rows["fp8-tensorwise"]["verdict"] == "pass" and rows["fp8-delayed"]["verdict"] == "not run"
    other = _runs_file(tmp_path / "c.json", {}, steps=30)
    proc = _cli("compare", "fp8", str(first), str(other))
    assert proc.returncode != 0 and "steps=30" in proc.stderr


def test_run_without_gpus_records_skips_and_fails(tmp_path):
    proc = _cli("run", "parallel", "--runs", "tp1,tp2-sp", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 1
    runs = json.loads((tmp_path / "o" / "parallel_runs.json").read_text())["runs"]
    assert runs["tp1"] == {"status": "skipped", "error": "needs 1 GPUs, 0 visible"}
    assert runs["tp2-sp"]["error"] == "needs 2 GPUs, 0 visible"
    rows = json.loads((tmp_path / "o" / "parallel_parity.json").read_text())["rows"]
    assert {r["run"]: r["verdict"] for r in rows}["tp2-sp"] == "skipped"


def test_a_failing_run_is_recorded_with_its_log_and_its_dependents_skip(tmp_path, monkeypatch, capsys):
    """The real CLI on this CPU machine exits 2 ('needs a CUDA GPU'): the driver records that, with the
    log tail, and does not start runs that would start from the failed run's weights."""
    monkeypatch.setattr(L, "visible_gpus", lambda: 2)
    code = L.main(["run", "parallel", "--runs", "tp1,tp2-sp", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert code == 1
    runs = json.loads((tmp_path / "o" / "parallel_runs.json").read_text())["runs"]
    assert runs["tp1"]["status"] == "failed" and runs["tp1"]["exit"] == 2
    assert "needs a CUDA GPU" in runs["tp1"]["log_tail"]
    assert runs["tp2-sp"] == {"status": "skipped", "error": "needs a finished tp1 run first"}
    log = (tmp_path / "w" / "parallel" / "tp1.log").read_text()
    assert log.splitlines()[0].endswith("checkpoint.save_final=false")  # the command line heads the log


@pytest.mark.parametrize("suite", list(L.SUITES.values()), ids=list(L.SUITES))
def test_every_run_comes_after_the_runs_it_starts_from_or_compares_with(suite):
    order = {r.name: i for i, r in enumerate(suite.runs)}
    for i, run in enumerate(suite.runs):
        for source in (run.resume_from, run.init_from, run.reference):
            if source:
                assert order[source] < i, f"{run.name} needs {source} first"


def test_only_suites_without_deterministic_kernels_cache_autotuning():
    assert L.launch_env(L.SUITES["fp8"]) == {"TRITON_CACHE_AUTOTUNING": "1"}
    assert L.launch_env(L.SUITES["7b-layers"]) == {"TRITON_CACHE_AUTOTUNING": "1"}
    assert L.launch_env(L.SUITES["parallel"]) == {}


def test_concurrent_runs_share_out_the_gpus(tmp_path, monkeypatch):
    """--concurrent 3 on two GPUs: three runs at once, slots on GPUs 0, 1, 0; each row says so."""
    import threading
    import time

    lock, active, seen = threading.Lock(), [0], []

    def fake_execute(suite, run, steps, work, timeout, results, gpu=None):
        with lock:
            active[0] += 1
            seen.append((run.name, gpu, active[0]))
        time.sleep(0.3)
        with lock:
            active[0] -= 1
        return _ok(_records(range(1, steps + 1)))

    monkeypatch.setattr(L, "visible_gpus", lambda: 2)
    monkeypatch.setattr(L, "gpu_memory_bytes", lambda: 10**12)  # ample: the memory check passes
    monkeypatch.setattr(L, "execute", fake_execute)
    code = L.main(["run", "fp8", "--runs", "bf16,bf16-repeat,fp8-tensorwise", "--steps", "20", "--concurrent", "3",
                   "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert code == 0
    assert max(n for _, _, n in seen) == 3 and sorted(g for _, g, _ in seen) == [0, 0, 1]
    runs = json.loads((tmp_path / "o" / "fp8_runs.json").read_text())["runs"]
    assert set(runs) == {"bf16", "bf16-repeat", "fp8-tensorwise"}
    assert all(r["concurrent"] == 3 and r["gpu"] in (0, 1) for r in runs.values())


def test_a_freed_gpu_takes_the_next_run(tmp_path, monkeypatch):
    """--concurrent 2 on two GPUs: the third run goes to the GPU whose run ended, not to the busy one."""
    import time

    order = []

    def fake_execute(suite, run, steps, work, timeout, results, gpu=None):
        order.append((run.name, gpu))
        time.sleep(0.6 if gpu == 0 else 0.1)  # the run on GPU 1 ends first
        return _ok(_records(range(1, steps + 1)))

    monkeypatch.setattr(L, "visible_gpus", lambda: 2)
    monkeypatch.setattr(L, "gpu_memory_bytes", lambda: 10**12)  # ample: the memory check passes
    monkeypatch.setattr(L, "execute", fake_execute)
    L.main(["run", "fp8", "--runs", "bf16,bf16-repeat,fp8-tensorwise", "--steps", "20", "--concurrent", "2",
            "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert order == [("bf16", 0), ("bf16-repeat", 1), ("fp8-tensorwise", 1)]


H100_BYTES, H200_BYTES = 81559 * 2**20, 143771 * 2**20  # nvidia-smi's memory.total


def test_concurrent_runs_must_fit_the_gpu_memory_together(tmp_path, monkeypatch, capsys):
    """Two 1B runs on one H100 ran out of memory (each held ~39 GiB): the estimate refuses them up front."""
    suite = L.SUITES["fp8"]
    runs = [r for r in suite.runs if r.name in ("bf16", "fp8-tensorwise-bf16ends")]
    problem = L.memory_problem(suite, runs, 300, tmp_path, 2, 1, H100_BYTES)
    assert problem and "2 runs would share a 86 GB GPU" in problem and "use --concurrent 1" in problem
    assert L.memory_problem(suite, runs, 300, tmp_path, 3, 1, H200_BYTES) is None  # ~45 GB each
    assert L.memory_problem(suite, runs, 300, tmp_path, 2, 2, H100_BYTES) is None  # one run a GPU
    assert L.memory_problem(suite, runs, 300, tmp_path, 2, 1, 0) is None  # no nvidia-smi: nothing to judge

    monkeypatch.setattr(L, "visible_gpus", lambda: 1)
    monkeypatch.setattr(L, "gpu_memory_bytes", lambda: H100_BYTES)
    monkeypatch.setattr(L, "execute", lambda *a, **k: pytest.fail("a run started"))
    code = L.main(["run", "fp8", "--runs", "bf16,fp8-tensorwise", "--concurrent", "2",
                   "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert code == 2 and "error: --concurrent 2: 2 runs would share" in capsys.readouterr().err


def test_concurrent_is_refused_where_runs_must_not_share_a_gpu_or_depend_on_each_other(tmp_path):
    out = ["--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    proc = _cli("run", "7b-layers", "--concurrent", "2", *out)
    assert proc.returncode == 2 and "compares tokens/s" in proc.stderr
    proc = _cli("run", "parallel", "--runs", "tp1,tp2-sp", "--concurrent", "2", *out)
    assert proc.returncode == 2 and "tp2-sp use several GPUs" in proc.stderr
    proc = _cli("run", "fp8", "--concurrent", "0", *out)
    assert proc.returncode == 2 and "must be >= 1" in proc.stderr


def test_concurrent_refuses_a_run_that_starts_from_another_selected_run(monkeypatch, capsys):
    a, b = L.Run("a", 1, ("checkpoint.save_initial=true",)), L.Run("b", 1, (), reference="a", init_from="a")
    monkeypatch.setitem(L.SUITES, "fp8", L.Suite("fp8", "configs/tiny.yaml", (), (a, b), default_steps=10))
    with pytest.raises(SystemExit) as exc:
        L.parse_args(["run", "fp8", "--concurrent", "2"])
    assert exc.value.code == 2 and "run b starts from run a" in capsys.readouterr().err
    assert [r.name for r in L.parse_args(["run", "fp8", "--runs", "b", "--concurrent", "2"]).selected] == ["b"]


def test_run_time_limit_defaults_to_the_suites_and_must_be_positive(capsys):
    # fp8-64k's runs took 280-370 s on an H200: the 300 s that suits the others would cut them off
    assert L.parse_args(["run", "fp8"]).timeout_s == 300.0
    assert L.parse_args(["run", "fp8-64k"]).timeout_s == L.SUITES["fp8-64k"].run_timeout_s == 540.0
    assert L.parse_args(["run", "fp8-64k", "--timeout-s", "90"]).timeout_s == 90.0
    with pytest.raises(SystemExit) as exc:
        L.parse_args(["run", "fp8", "--timeout-s", "0"])
    assert exc.value.code == 2 and "--timeout-s 0: must be > 0" in capsys.readouterr().err
