"""`hybrid-megatron eval`: every mistake is one line and exit 2 before any GPU work; the output location."""

from __future__ import annotations

import pytest
import torch
import yaml

from hybrid_megatron.checkpoint import layout
from hybrid_megatron.cli import main
from hybrid_megatron.config import load_run_config
from hybrid_megatron.config_io import to_dict
from hybrid_megatron.devtools import REPO_ROOT
from hybrid_megatron.eval import run
from hybrid_megatron.eval.suites import EvalOptions, parse_lengths, parse_suites
from tests.checkpoint_helpers import quickstart_checkpoint

TASKS = REPO_ROOT / "tests" / "fixtures" / "lm_eval"


@pytest.fixture()
def run_dir(tmp_path):
    """A run directory as pretrain leaves it: config.yaml and a checkpoint whose run config is complete (the
    sample data config, with its validation section)."""
    run = tmp_path / "run"
    save = quickstart_checkpoint(run / "checkpoints")
    step = save / "step-000000"
    model = yaml.safe_load((step / layout.RUN_CONFIG).read_text())["model"]
    cfg = load_run_config(REPO_ROOT / "configs" / "tiny.yaml", [f"logging.run_dir={run}"])
    full = {**to_dict(cfg), "model": model}
    (step / layout.RUN_CONFIG).write_text(yaml.safe_dump(full, sort_keys=False))
    (run / "config.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    return run


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("argv, message", [
    (["--suite", "ppl,bogus"], "unknown suite 'bogus' (known: ppl, length, lm-eval, mqar, state, niah, generation)"),
    (["--suite", "ppl,,length"], "without empty items"),
    (["--suite", "ppl,ppl"], "names an item twice"),
    (["--suite", "length", "--lengths", "1,0"], "'0' is not a positive whole multiple"),
    (["--suite", "length", "--bin-size", "0"], "--bin-size 0: must be at least 1"),
    (["--suite", "lm-eval"], "--suite lm-eval needs --tasks"),
    (["--suite", "niah", "--niah-items", "0"], "--niah-items 0: must be at least 1"),
    (["--suite", "state", "--attention-window", "-1"], "--attention-window -1: must be >= 0"),
    (["--suite", "mqar", "--kv-pairs", "4,x"], "--kv-pairs: 'x' is not a positive integer"),
    (["--suite", "ppl", "--tasks", "x"], "--tasks/--task-dir are options of --suite lm-eval"),
    (["--suite", "lm-eval", "--tasks", "x", "--task-dir", "/nonexistent"], "--task-dir /nonexistent: no such"),
])
def test_bad_options_are_one_line_and_exit_2(run_dir, capsys, argv, message):
    assert main(["eval", str(run_dir / "checkpoints"), *argv]) == 2
    assert message in _error(capsys)


def test_a_checkpoint_without_validation_data_is_one_line(run_dir, tmp_path, capsys):
    data = yaml.safe_load((REPO_ROOT / "configs" / "data" / "sample.yaml").read_text())
    del data["validation"]
    plain = tmp_path / "no_val.yaml"
    plain.write_text(yaml.safe_dump(data))
    assert main(["eval", str(run_dir / "checkpoints"), "--suite", "length", f"data={plain}",
                 "train.eval_interval=null"]) == 2
    assert "--suite length needs validation data" in _error(capsys)


def test_a_missing_checkpoint_and_a_model_only_one_are_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing"), "--suite", "ppl"]) == 2
    assert "no such checkpoint directory" in _error(capsys)
    bare = quickstart_checkpoint(tmp_path / "bare")
    assert main(["eval", str(bare), "--suite", "ppl", "--out", str(tmp_path / "o")]) == 2
    assert "model-only checkpoint" in _error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_without_a_gpu_it_says_so_in_one_line(run_dir, capsys):
    assert main(["eval", str(run_dir / "checkpoints"), "--suite", "ppl,length"]) == 2
    assert _error(capsys) == "error: eval needs a CUDA GPU (none visible)"
    assert not (run_dir / "eval").exists()


def test_unknown_lm_eval_task_is_one_line():
    from data_pipeline.errors import ConfigError
    from hybrid_megatron.eval.lm_eval_suite import check_tasks, task_manager

    manager = task_manager(TASKS)
    check_tasks(["python_next_line", "python_bpb"], manager)
    with pytest.raises(ConfigError, match="unknown lm-eval task 'no_such_task'"):
        check_tasks(["python_next_line", "no_such_task"], manager)


def test_the_default_output_is_inside_the_run_directory(run_dir, tmp_path):
    step_dir, cfg = run.resolve(str(run_dir / "checkpoints"), [], EvalOptions(suites=["ppl"]), world_size=1)
    assert step_dir == run_dir / "checkpoints" / "step-000000"
    assert run.default_out(step_dir) == run_dir / "eval" / "step-000000"
    outside = quickstart_checkpoint(tmp_path / "loose")
    with pytest.raises(Exception, match="pass --out DIR"):
        run.default_out(outside / "step-000000")


def test_one_process_evaluates_at_tp1_pp1_unless_told(run_dir):
    opts = EvalOptions(suites=["ppl"])
    ckpt = str(run_dir / "checkpoints")
    _, cfg = run.resolve(ckpt, ["parallel.tensor_model_parallel_size=2"], opts, world_size=1)
    assert cfg.parallel.tensor_model_parallel_size == 2
    for world in (1, 2):
        _, cfg = run.resolve(ckpt, [], opts, world_size=world)
        assert cfg.parallel.tensor_model_parallel_size == 1 and cfg.parallel.pipeline_model_parallel_size == 1


def test_suite_and_length_parsing():
    assert parse_suites("length,ppl") == ["length", "ppl"]
    assert parse_lengths("8,1,2") == [1, 2, 8]


def test_lm_eval_refuses_a_model_transformers_cuda_path_cannot_run(monkeypatch):
    """Hidden 384 with 12 Mamba heads gives an in_proj width of 1804 (measured to fail in causal-conv1d)."""
    import importlib.util

    from hybrid_megatron.convert.checks import hf_cuda_conv_problem

    bad = load_run_config(REPO_ROOT / "configs" / "tiny.yaml", ["model.hidden_size=384"])
    assert "= 1804 is not a multiple of 8" in hf_cuda_conv_problem(bad.model)
    for hidden in (256, 512):
        good = load_run_config(REPO_ROOT / "configs" / "tiny.yaml", [f"model.hidden_size={hidden}"])
        assert hf_cuda_conv_problem(good.model) is None
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "causal_conv1d" else real_find_spec(name, *a))
    from data_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="--suite lm-eval: the Mamba in_proj width"):
        run.check_hf_cuda(bad)
    run.check_hf_cuda(load_run_config(REPO_ROOT / "configs" / "tiny.yaml", []))
