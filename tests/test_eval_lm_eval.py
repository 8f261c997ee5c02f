"""The `lm-eval` suite on a CPU: the checkpoint is exported and lm-evaluation-harness runs the local tasks
the tests ship; its bits per byte equal the exported model's own log-likelihood of the same text."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hybrid_megatron.devtools import REPO_ROOT
from hybrid_megatron.eval.suites import EvalOptions
from tests.checkpoint_helpers import quickstart_checkpoint

pytest.importorskip("lm_eval")
TASKS = REPO_ROOT / "tests" / "fixtures" / "lm_eval"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from hybrid_megatron.eval.lm_eval_suite import run_lm_eval

    ckpt = quickstart_checkpoint(tmp_path_factory.mktemp("run") / "checkpoints")
    opts = EvalOptions(suites=["lm-eval"], tasks=["python_next_line", "python_bpb"], task_dir=TASKS, batch_size=4,
                       progress=False)
    return run_lm_eval(ckpt / "step-000000", opts, "cpu")


def test_every_task_reports_its_metrics_over_every_document(results):
    tasks = results["tasks"]
    assert set(tasks) == {"python_next_line", "python_bpb"}
    assert {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"} <= set(tasks["python_next_line"])
    assert {"bits_per_byte", "byte_perplexity", "word_perplexity"} <= set(tasks["python_bpb"])
    lines = (TASKS / "python_next_line.jsonl").read_text().splitlines()
    assert results["samples"] == {"python_next_line": len(lines), "python_bpb": 8}
    assert 0.0 <= tasks["python_next_line"]["acc"] <= 1.0
    assert results["dtype"] == "float32" and results["device"] == "cpu"


def test_bits_per_byte_is_the_exported_models_own_likelihood(results, tmp_path):
    """Recomputed here without the harness: -sum log p(doc | EOS) / bytes / ln 2."""
    from transformers import AutoModelForCausalLM

    from hybrid_megatron.convert.to_hf import ExportOptions, export

    ckpt = quickstart_checkpoint(tmp_path / "checkpoints")
    export(ckpt, tmp_path / "hf", ExportOptions(dtype="fp32", progress=False))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    eos = json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"]
    total_ll, total_bytes = 0.0, 0
    for line in (TASKS / "python_bpb.jsonl").read_text().splitlines():
        data = json.loads(line)["text"].encode("utf-8")
        ids = torch.tensor([[eos, *data]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        total_ll += float(logp.gather(1, ids[0, 1:, None]).sum())
        total_bytes += len(data)
    expected = -total_ll / total_bytes / math.log(2)
    assert results["tasks"]["python_bpb"]["bits_per_byte"] == pytest.approx(expected, rel=1e-4)
    # a model trained 400 steps on Python source compresses it well below 8 bits per byte
    assert expected < 4.0
