"""Held-out validation data: chosen by content, disjoint from training (provably), the same windows at any
data-parallel size."""

from __future__ import annotations

import json

import pytest

from data_helpers import random_docs, write_jsonl
from data_pipeline.config import DataConfig
from data_pipeline.errors import ConfigError
from data_pipeline.holdout import check_disjoint, source_hashes
from data_pipeline.prepare import PrepareOptions, prepare_data
from data_pipeline.shards import SourceIndex
from data_pipeline.validation import ValidationSet
from hybrid_megatron.cli import main


def _prepare(root, name, docs, workers=1, fraction=0.2):
    raw = write_jsonl(root / "raw" / f"{name}.jsonl", docs)
    prepare_data(PrepareOptions(inputs=[str(raw)], output=str(root / name), source=name, workers=workers,
                                member_tokens=65536, progress=False, holdout_fraction=fraction,
                                holdout_output=str(root / f"{name}-val")))
    return root / name, root / f"{name}-val"


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("holdout")
    docs = random_docs(3, 400, 600)
    docs += docs[:50]  # duplicates must land on the side of their first copy
    return root, _prepare(root, "web", docs)


def test_held_out_documents_are_disjoint_from_training_and_the_split_is_reproducible(split, tmp_path):
    root, (train, val) = split
    stats = json.loads((val / "stats.json").read_text())
    assert stats["holdout"]["split"] == "validation" and 0.1 < stats["documents"] / 450 < 0.3
    report = check_disjoint({"web": SourceIndex.open(train)}, {"web_val": SourceIndex.open(val)})
    assert report["web_val"]["shared_with_training"] == {"web": 0}
    # two workers, another directory: the same documents on each side
    again_train, again_val = _prepare(tmp_path, "web", random_docs(3, 400, 600) + random_docs(3, 400, 600)[:50],
                                      workers=2)
    assert source_hashes(SourceIndex.open(again_val)) == source_hashes(SourceIndex.open(val))
    assert source_hashes(SourceIndex.open(again_train)) == source_hashes(SourceIndex.open(train))


def _config(root, **validation):
    return DataConfig.from_dict({
        "seed": 5, "global_batch_tokens": 4096, "seq_len": 256, "sources": {"web": str(root / "web")},
        "phases": [{"name": "pretrain", "tokens": 40000, "weights": {"web": 1.0}}], "batch_size_multiple": 4,
        "validation": {"sources": {"web_val": str(root / "web-val")}, **validation}})


def test_validation_windows_are_the_same_set_at_every_dp_size(split):
    root, _ = split
    config = _config(root, tokens=16 * 256)
    by_dp = {}
    for dp in (1, 2, 4):
        rows = []
        for rank in range(dp):
            (batch,) = ValidationSet(config, rank, dp, seq_len=256).batches()
            rows += list(zip(batch.hashes, batch.input_ids.tolist()))
        by_dp[dp] = rows
    assert len(by_dp[1]) == 16 and by_dp[1] == by_dp[2] == by_dp[4]  # same windows, same order
    again = [h for h, _ in by_dp[1]]
    (batch,) = ValidationSet(config, 0, 1, seq_len=256).batches()
    assert batch.hashes == again  # the same batches every evaluation


def test_audit_proves_the_split_and_catches_a_leak(split, tmp_path, capsys):
    root, _ = split
    cfg = tmp_path / "data.yaml"
    cfg.write_text(json.dumps(_config(root).to_dict()))
    assert main(["data", "audit", str(cfg), "--validation"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["disjoint"] and out["validation"]["web_val"]["shared_with_training"] == {"web": 0}
    # a "validation" source that is a copy of training data: exit 3, naming both
    import shutil

    shutil.copytree(root / "web", tmp_path / "copy")
    leak = _config(root).to_dict()
    leak["validation"]["sources"] = {"copy": str(tmp_path / "copy")}
    cfg.write_text(json.dumps(leak))
    assert main(["data", "audit", str(cfg), "--validation"]) == 3
    assert "validation source copy shares" in capsys.readouterr().err


@pytest.mark.parametrize("validation,message", [
    ({"sources": {}}, "needs at least one validation source"),
    ({"sources": {"web": "x"}}, "needs a name of its own"),
    ({"sources": {"v": "x"}, "tokens": 0}, "data.validation.tokens=0: must be positive"),
    ({"sources": {"v": "x"}, "shuffle": True}, "unknown field"),
])
def test_validation_config_errors_name_the_field(split, validation, message):
    root, _ = split
    raw = _config(root).to_dict()
    raw["validation"] = validation
    with pytest.raises(ConfigError, match=message):
        DataConfig.from_dict(raw)


def test_a_validation_set_too_small_for_one_batch_is_one_line(split):
    root, _ = split
    with pytest.raises(ConfigError, match="gives no batch of 4 windows"):
        ValidationSet(_config(root, tokens=256), 0, 1, seq_len=256)


def test_evaluations_fall_on_the_interval_the_anneal_and_the_end():
    from hybrid_megatron.config import load_run_config
    from hybrid_megatron.training.validate import evaluation_due

    from data_pipeline.schedule import build_schedule

    cfg = load_run_config("configs/tiny.yaml")
    sch = build_schedule(cfg.data)
    anneal = sch.phase_start(1)
    due = [s for s in range(1, sch.total_steps + 1)
           if evaluation_due(s, sch.total_steps, cfg.train.eval_interval, s == anneal)]
    assert due == sorted({*range(200, sch.total_steps + 1, 200), anneal, sch.total_steps})
    assert evaluation_due(7, 10, None, False) is False and evaluation_due(10, 10, None, False) is True
