"""GPU: `hybrid-megatron eval` on a checkpoint that `pretrain` just wrote, in subprocesses as users run it.

``ppl`` must give the loss the run's own validation logged at the same step (the same windows, the same
weights), and ``length`` at 1x must give it again (the same windows binned by position); ``lm-eval``
runs the local tasks on the exported model.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gpu_helpers import ROOT, pretrain_env, run_pretrain

pytestmark = pytest.mark.gpu
STEPS = 30


def _eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybrid_megatron", "eval", *args, "--no-progress"], cwd=ROOT,
                          env=pretrain_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    proc = run_pretrain(["configs/tiny.yaml", f"train.train_steps={STEPS}", "schedule.lr_warmup_steps=5",
                         f"logging.run_dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_ppl_and_length_match_the_runs_own_validation(run):
    proc = _eval(str(run / "checkpoints"), "--suite", "ppl,length", "--lengths", "1,2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = run / "eval" / f"step-{STEPS:06d}"
    results = json.loads((out / "results.json").read_text())
    logged = [json.loads(line) for line in (run / "val.jsonl").read_text().splitlines()][-1]
    assert logged["step"] == STEPS
    ppl = results["suites"]["ppl"]
    assert ppl["tokens"] == logged["tokens"]
    assert ppl["loss"] == pytest.approx(logged["loss"], rel=1e-4)
    for name, loss in logged["loss_by_source"].items():
        assert ppl["by_source"][name]["loss"] == pytest.approx(loss, rel=1e-4), name
    length = results["suites"]["length"]
    one, two = length["by_length"]["1x"], length["by_length"]["2x"]
    assert one["tokens"] == ppl["tokens"] and one["loss"] == pytest.approx(ppl["loss"], rel=1e-5)
    assert one["beyond_train_len"] is None and two["beyond_train_len"]["tokens"] > 0
    assert sum(b["tokens"] for b in two["bins"]) == two["tokens"]
    for png in ("ppl.png", "length.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert f"ppl/loss: {ppl['loss']:.4f}" in proc.stdout


def test_lm_eval_runs_the_local_tasks_on_the_exported_model(run, tmp_path):
    pytest.importorskip("lm_eval")
    proc = _eval(str(run / "checkpoints"), "--suite", "lm-eval", "--tasks", "python_next_line,python_bpb",
                 "--task-dir", str(ROOT / "tests" / "fixtures" / "lm_eval"), "--out", str(tmp_path / "lm"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "lm" / "results.json").read_text())["suites"]["lm-eval"]
    assert results["device"] == "cuda" and results["samples"]["python_next_line"] == 24
    assert 0.0 < results["tasks"]["python_bpb"]["bits_per_byte"] < 8.0
    assert (tmp_path / "lm" / "lm_eval.png").read_bytes()[:4] == b"\x89PNG"


def test_niah_and_generation_run_on_the_quickstart_model(run, tmp_path):
    proc = _eval(str(run / "checkpoints"), "--suite", "niah,generation", "--lengths", "1,2", "--niah-depths", "3",
                 "--niah-items", "4", "--prompts", "4", "--max-new-tokens", "32", "--out", str(tmp_path / "tx"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    suites = json.loads((tmp_path / "tx" / "results.json").read_text())["suites"]
    assert [(c["multiple"], c["depth"], c["items"]) for c in suites["niah"]["cells"]] == [
        (k, d, 4) for k in (1, 2) for d in (0.0, 0.5, 1.0)]
    gen = suites["generation"]["by_temperature"]
    assert set(gen) == {"0.0", "0.7", "1.0"}
    for row in gen.values():
        assert 0 < row["mean_length"] <= 32 and 0 <= row["distinct_2"] <= 1 and len(row["samples"]) == 3
    assert (tmp_path / "tx" / "niah.png").read_bytes()[:4] == b"\x89PNG"
