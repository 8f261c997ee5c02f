"""GPU: the memory cuts of the `state` suite do what they claim through the real megatron forward, and the
`mqar` and `state` suites run end to end on a model `pretrain` trained on MQAR items.

A cut at position p gives the cut layer type a document start at p: for a model made only of that layer
type (and MLPs), the logits from p on must equal those of the suffix run as a document of its own, and the
logits before p must not move."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from gpu_helpers import ROOT, init_single_process, pretrain_env, run_pretrain

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def world():
    init_single_process()


def _mqar_config(pattern: str):
    from hybrid_megatron.config import load_run_config

    return load_run_config(ROOT / "configs" / "mqar" / "hybrid.yaml", [f"model.hybrid_layer_pattern={pattern}"])


def _logits(model, cfg, batch, cut=None):
    import torch

    from hybrid_megatron.eval.recall import cut_rows
    from hybrid_megatron.training.step import forward_step, split_micro_batches

    (mb,) = split_micro_batches(batch, batch.input_ids.shape[0], True, "cuda")
    if cut:
        kind, position = cut
        (other,) = split_micro_batches(cut_rows(batch, position), batch.input_ids.shape[0], True, "cuda")
        mb.layer_params = {kind: other.packed_seq_params}
    with torch.no_grad():
        out, _ = forward_step(iter([mb]), model, logits=True)
    return out.float().reshape(batch.input_ids.shape[0], batch.input_ids.shape[1], -1)


@pytest.mark.parametrize("pattern, kind", [("M-M-", "mamba"), ("G-G-", "gdn"), ("*-*-", "attention")])
def test_a_cut_makes_the_suffix_a_document_of_its_own_for_that_layer_type(world, pattern, kind):
    """In bf16 (as trained and evaluated: TE has no fp32 kernel for packed attention), so agreement is read
    against the size of the change the cut makes."""
    from data_pipeline.synthetic import MqarOptions
    from hybrid_megatron.eval.recall import item_batch, mqar_cell
    from hybrid_megatron.model.build import build_model_chunks
    from hybrid_megatron.training.setup import half_precision

    cfg = _mqar_config(pattern)
    model = half_precision(cfg, build_model_chunks(cfg, 2048, 256)[0])
    model.eval()
    base = MqarOptions(num_kv_pairs=(8,), seq_len=256, vocab=2048, docs=1, seed=0)
    cell = mqar_cell(base, 8, 256, 4, seed=5)
    batch = item_batch(cell, slice(0, 4), base.pad_id, base.eos_id)
    p = cell.query_start - 100  # inside the PAD run, not on a chunk boundary
    full = _logits(model, cfg, batch)
    cut = _logits(model, cfg, batch, (kind, p))
    suffix_cell = type(cell)(8, 256 - p, cell.tokens[:, p:], cell.masks[:, p:], 0)
    alone = _logits(model, cfg, item_batch(suffix_cell, slice(0, 4), base.pad_id, base.eos_id))
    changed = (cut[:, p:] - full[:, p:]).abs().max().item()
    before = (cut[:, :p] - full[:, :p]).abs().max().item()
    off = (cut[:, p:] - alone).abs().max().item()
    print(f"{kind} cut: change after the cut {changed:.4g}, before it {before:.4g}, against the suffix alone {off:.4g}")
    assert changed > 0 and before <= 0.02 * changed and off <= 0.05 * changed
    # a cut of a layer type the model lacks installs no hook: bit for bit the full model
    other = "attention" if kind == "mamba" else "mamba"
    assert (_logits(model, cfg, batch, (other, p)) == full).all()


def test_mqar_and_state_run_on_a_model_pretrain_trained(tmp_path):
    from data_pipeline.synthetic import MqarOptions, write_mqar

    data = tmp_path / "data"
    write_mqar(data / "train", MqarOptions(num_kv_pairs=(4, 8), seq_len=256, vocab=2048, docs=4000, seed=0),
               progress=False)
    write_mqar(data / "val", MqarOptions(num_kv_pairs=(4, 8), seq_len=256, vocab=2048, docs=256, seed=1),
               progress=False)
    run = tmp_path / "run"
    proc = run_pretrain(["configs/mqar/hybrid.yaml", f"data.sources.mqar={data / 'train'}",
                         f"data.validation.sources.mqar_val={data / 'val'}", "data.validation.tokens=32768",
                         "train.train_steps=60", "schedule.lr_warmup_steps=5", "train.eval_interval=30",
                         "train.micro_batch_size=16", f"logging.run_dir={run}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    val = [json.loads(x) for x in (run / "val.jsonl").read_text().splitlines()]
    # answers only: below a uniform guess over the vocabulary once the model knows answers are values (MQAR's
    # own phase transition, recall proper, may come later than 60 steps)
    assert [v["step"] for v in val] == [30, 60] and val[-1]["loss"] < math.log(2048)
    def evaluate(suites: str, out):
        proc = subprocess.run([sys.executable, "-m", "hybrid_megatron", "eval", str(run / "checkpoints"), "--suite",
                               suites, "--items", "128", "--kv-pairs", "4,8", "--out", str(out), "--no-progress"],
                              cwd=ROOT, env=pretrain_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads((out / "results.json").read_text())["suites"]

    results = evaluate("mqar,state", tmp_path / "eval")
    alone = evaluate("state", tmp_path / "state_alone")  # computes its full condition itself
    assert [(c["pairs"], c["answers"]) for c in results["mqar"]["cells"]] == [(4, 512), (8, 1024)]
    for c in results["state"]["cells"]:
        assert set(c["accuracy"]) == {"full", "ssm_cut", "attention_cut"}
        assert all(0.0 <= c["ssm_cut"][test]["p_value"] <= 1.0 for test in ("mcnemar", "mcnemar_items"))
    # the same items, the same full model: the state suite's full condition is the mqar suite's outcomes, item by
    # item, whether it takes mqar's (run together) or computes them itself (run alone)
    for state in (results["state"], alone["state"]):
        assert [(c["items_fingerprint"], c["outcomes"]["full"]) for c in state["cells"]] == [
            (c["items_fingerprint"], c["outcomes"]) for c in results["mqar"]["cells"]]
    def shown(cells):
        return [{k: v for k, v in c.items() if k != "outcomes"} for c in cells]

    print(json.dumps({"mqar": shown(results["mqar"]["cells"]), "state": shown(results["state"]["cells"])}))
