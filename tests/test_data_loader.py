"""The stateful loader: exact mixing, replay, DP/worker invariance, exact resume, bad data."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from data_pipeline.audit import audit_lines
from data_pipeline.config import DataConfig
from data_pipeline.errors import ConfigError, DataError
from data_pipeline.loader import build_loader, config_vocab_size
from data_pipeline.mixture import phase_components
from data_pipeline.packing import cu_seqlens
from tests.data_helpers import make_source, mix_config


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {"a": make_source(root, "a", 1), "b": make_source(root, "b", 2), "c": make_source(root, "c", 3)}


def global_batches(config: DataConfig, dp_size: int, steps: int | None = None):
    """Per step: (phase, seq_len, [(source, hash, replay)] in global order) gathered over all ranks."""
    loaders = [build_loader(config, r, dp_size) for r in range(dp_size)]
    out = []
    try:
        for step in range(steps or loaders[0].total_steps):
            bs = [next(ld) for ld in loaders]
            out.append((bs[0].phase, bs[0].seq_len,
                        [x for b in bs for x in zip(b.sources, b.hashes, b.replay)]))
    finally:
        for ld in loaders:
            ld.close()
    return out


def test_exact_ratios_replay_share_and_no_repeats(sources):
    config = mix_config(sources)
    comps = phase_components(config)
    batches = global_batches(config, 1)
    assert [p for p, _, _ in batches].count("anneal") > 0
    seen: dict[str, set] = {"a": set(), "b": set(), "c": set()}
    for phase, _, samples in batches:
        n = len(samples)
        weights = comps[0 if phase == "pretrain" else 1]
        for comp in weights:
            got = sum(1 for s, _, r in samples if s == comp.source and r == comp.replay)
            assert abs(got - n * comp.weight) < 1.0, (phase, comp, got, n)
        if phase == "anneal":
            assert abs(sum(r for _, _, r in samples) - 0.5 * n) < 1.0
            assert {s for s, _, r in samples if r} <= {"a", "b"}
        for s, h, _ in samples:
            assert h not in seen[s], f"sample of {s} repeated within its first epoch"
            seen[s].add(h)


def test_replay_continues_phase1_streams(sources):
    config = mix_config(sources)
    batches = global_batches(config, 1)
    boundary = next(i for i, (p, _, _) in enumerate(batches) if p == "anneal")
    phase1 = {h for _, _, samples in batches[:boundary] for _, h, _ in samples}
    replayed = {(s, h) for _, _, samples in batches[boundary:] for s, h, r in samples if r}
    # the same run with a longer phase 1 reads the a/b streams past the boundary: replay must read
    # exactly those continuing windows, nothing phase 1 already delivered
    longer = mix_config(sources, phases=[{"name": "pretrain", "tokens": 120000, "weights": {"a": 0.7, "b": 0.3}}])
    cont = global_batches(longer, 1)
    assert [x[2] for x in cont[:boundary]] == [x[2] for x in batches[:boundary]]
    continuing = {(s, h) for _, _, samples in cont[boundary:] for s, h, _ in samples}
    assert replayed and replayed <= continuing
    assert not {h for _, h in replayed} & phase1


def test_same_global_batches_for_dp_sizes_and_workers(sources):
    base = global_batches(mix_config(sources), 1)
    assert global_batches(mix_config(sources), 2) == base
    assert global_batches(mix_config(sources), 4) == base
    assert global_batches(mix_config(sources, num_workers=1), 2, steps=8) == base[:8]
    assert global_batches(mix_config(sources, num_workers=2), 1, steps=8) == base[:8]


def test_curriculum_constant_tokens_per_step(sources):
    config = mix_config(sources)
    batches = global_batches(config, 1)
    lens = [sl for _, sl, _ in batches]
    assert lens[0] == 64 and lens[-1] == 256 and lens == sorted(lens) and len(set(lens)) > 2
    for _, sl, samples in batches:
        # sequences = tokens // seq_len rounded down to batch_size_multiple=4; progress counts what was delivered
        assert len(samples) == (4096 // sl) // 4 * 4 and 4096 - 4 * sl < len(samples) * sl <= 4096


@pytest.mark.parametrize("cut,where", [(3, "curriculum"), (9, "pretrain"), (18, "anneal")])
def test_resume_matches_straight_run(sources, cut, where):
    config = mix_config(sources)
    total = build_loader(config, 0, 1).total_steps
    assert cut < total
    straight = list(audit_lines(config, 2, total))
    nxt = straight[2 * cut]
    assert {"curriculum": nxt["seq_len"] < 256, "pretrain": nxt["phase"] == "pretrain",
            "anneal": nxt["phase"] == "anneal"}[where]
    state: list = []
    first = list(audit_lines(config, 2, cut, None, state))
    saved = json.loads(json.dumps(state[0]))  # what a checkpoint stores
    rest = list(audit_lines(config, 2, total, saved))
    assert first + rest == straight


def test_resume_at_phase_boundary(sources):
    config = mix_config(sources)
    lines = list(audit_lines(config, 1, 10_000))
    boundary = next(ln["step"] for ln in lines if ln["phase"] == "anneal")
    state: list = []
    first = list(audit_lines(config, 1, boundary, None, state))
    assert first[-1]["phase"] == "pretrain"
    assert first + list(audit_lines(config, 1, 10_000, state[0])) == lines


def test_refuses_state_of_other_config(sources):
    state: list = []
    list(audit_lines(mix_config(sources), 1, 2, None, state))
    other = build_loader(mix_config(sources, seed=8), 0, 1)
    with pytest.raises(ConfigError, match="refusing to resume"):
        other.load_state_dict(state[0])


def test_packing_arrays(sources):
    config = mix_config(sources, global_batch_tokens=4096, curriculum=None, seq_len=512)
    batch = next(build_loader(config, 0, 1))
    eos = 256
    assert batch.input_ids.shape == (8, 512) and batch.input_ids.dtype == np.int64
    assert (batch.labels[:, :-1] == batch.input_ids[:, 1:]).all()
    for row in range(batch.input_ids.shape[0]):
        doc, pos = 0, 0
        for i, tok in enumerate(batch.input_ids[row]):
            assert batch.seq_idx[row, i] == doc and batch.position_ids[row, i] == pos
            doc, pos = (doc + 1, 0) if tok == eos else (doc, pos + 1)
    assert (batch.seq_idx[:, -1] > 0).any()  # the documents are short enough to see boundaries
    cu = cu_seqlens(batch.seq_idx)
    assert cu[0] == 0 and cu[-1] == batch.input_ids.size and (np.diff(cu) > 0).all()
    off = build_loader(mix_config(sources, curriculum=None, seq_len=512, reset_at_document_boundaries=False,
                                  eod_mask_loss=True), 0, 1)
    b2 = next(off)
    assert (b2.input_ids == batch.input_ids).all() and (b2.seq_idx == 0).all()
    assert (b2.position_ids == np.arange(512)).all()
    assert ((b2.loss_mask == 0) == (b2.input_ids == eos)).all()
    assert config_vocab_size(config) == 257 and off.eos_id == eos


def test_epoch_wrap_is_logged(tmp_path, caplog):
    small = {"a": make_source(tmp_path, "a", 11, num_docs=40, mean_len=300, files=1),
             "b": make_source(tmp_path, "b", 12, num_docs=40, mean_len=300, files=1),
             "c": make_source(tmp_path, "c", 13, num_docs=40, mean_len=300, files=1)}
    with caplog.at_level(logging.WARNING, logger="data_pipeline.mixture"):
        batches = global_batches(mix_config(small), 1)
    assert any("source a: epoch 1 begins" in r.message for r in caplog.records)
    read_a = sum(sl for _, sl, samples in batches for s, _, _ in samples if s == "a")
    epochs_logged = sum("source a: epoch" in r.message for r in caplog.records)
    size_a = json.loads((small["a"] / "stats.json").read_text())["tokens"]
    assert epochs_logged == read_a // size_a  # one line per wrap, no more


def _corrupt_member(source_dir, member: int) -> str:
    index = json.loads((source_dir / "index.json").read_text())
    m = index["members"]
    shard = source_dir / index["shards"][m["shard"][member]]["name"]
    data = bytearray(shard.read_bytes())
    start = m["offset"][member] + m["size"][member] // 2
    data[start:start + 16] = bytes(16)
    shard.write_bytes(bytes(data))
    return m["name"][member]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_member_stops_without_advancing(tmp_path, num_workers):
    src = {k: make_source(tmp_path, k, seed) for k, seed in (("a", 21), ("b", 22), ("c", 23))}
    name = _corrupt_member(src["a"], 1)
    loader = build_loader(mix_config(src, num_workers=num_workers), 0, 1)
    before = loader.state_dict()
    with pytest.raises(DataError, match=rf"shard-000000.tar: member {name}: corrupt zstd"):
        for _ in loader:
            before = loader.state_dict()
    failed_at = before["step"]
    assert loader.state_dict() == before  # nothing advanced past the last delivered batch
    with pytest.raises(DataError):
        next(loader)
    assert loader.state_dict()["step"] == failed_at
    loader.close()


def test_truncated_shard_and_missing_dir(tmp_path, sources):
    src = {k: make_source(tmp_path, k, seed) for k, seed in (("a", 31), ("b", 32), ("c", 33))}
    shard = src["b"] / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(DataError, match=r"b/shard-000000.tar: shard is \d+ bytes, index says \d+"):
        build_loader(mix_config(src), 0, 1)
    src["b"] = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=r"data.sources.b=.*nowhere.*does not exist"):
        build_loader(mix_config(src), 0, 1)


def test_dp_size_must_divide_batch_multiple(sources):
    with pytest.raises(ConfigError, match="data-parallel size 3"):
        build_loader(mix_config(sources), 0, 3)
