"""CPU checks of the suites tools/loss_parity.py runs: every planned run is a valid config built and validated
the way `pretrain` does it, each suite covers what it is for, and every run comes after the runs it needs."""

from __future__ import annotations

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
