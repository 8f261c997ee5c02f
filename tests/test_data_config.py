"""Data config validation, the step schedule and the per-step allocation rule."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from data_pipeline.config import DataConfig, load_data_config
from data_pipeline.errors import ConfigError
from data_pipeline.mixture import allocate
from data_pipeline.schedule import build_schedule

BASE = {
    "seed": 1234, "global_batch_tokens": 65536, "seq_len": 4096,
    "sources": {"web": "/data/web", "code": "/data/code", "hq": "/data/hq"},
    "phases": [{"name": "pretrain", "tokens": 50_000_000, "weights": {"web": 0.7, "code": 0.3}},
               {"name": "anneal", "tokens": 6_000_000, "weights": {"hq": 1.0}, "replay": 0.6}],
    "curriculum": {"min_seq_len": 256, "max_seq_len": 4096, "schedule": "fixed_linear",
                   "total_tokens": 10_000_000, "step": 64},
}


def with_(path: str, value) -> dict:
    d = json.loads(json.dumps(BASE))
    *head, last = path.split(".")
    node = d
    for key in head:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return d


def test_round_trip_and_yaml(tmp_path):
    cfg = DataConfig.from_dict(BASE)
    assert DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"model": {}, "data": cfg.to_dict()}))
    assert load_data_config(tmp_path / "run.yaml") == cfg
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (tmp_path / "by_path.yaml").write_text(yaml.safe_dump({"model": {}, "data": str(tmp_path / "data.yaml")}))
    assert load_data_config(tmp_path / "by_path.yaml") == cfg
    (tmp_path / "dangling.yaml").write_text(yaml.safe_dump({"data": "no/such.yaml"}))
    with pytest.raises(ConfigError, match=r"dangling.yaml: data: config file not found: no/such.yaml"):
        load_data_config(tmp_path / "dangling.yaml")
    assert cfg.fingerprint() == DataConfig.from_dict(with_("num_workers", 2)).fingerprint()
    assert cfg.fingerprint() != DataConfig.from_dict(with_("seed", 1)).fingerprint()


@pytest.mark.parametrize("path,value,message", [
    ("phases.1.replay", 1.2, "data.phases[1].replay=1.2: must be in [0, 1)"),
    ("phases.1.replay", -0.1, "data.phases[1].replay=-0.1: must be in [0, 1)"),
    ("phases.0.weights", {"web": 0.7, "nope": 0.3}, "data.phases[0].weights.nope: unknown source"),
    ("phases.0.weights", {"web": 0.0}, "data.phases[0].weights.web=0.0: must be a positive finite number"),
    ("phases.0.weights", {"web": -1}, "data.phases[0].weights.web=-1: must be a positive"),
    ("phases.0.tokens", 0, "data.phases[0].tokens=0: a phase needs a positive number of tokens"),
    ("phases.0.replay", 0.5, "data.phases[0].replay=0.5: the first phase has nothing to replay"),
    ("phases.1.name", "pretrain", "data.phases[1].name='pretrain': duplicate phase name"),
    ("seed", KeyError, "data.seed: is required"),
    ("seed", "x", "data.seed='x': must be int"),
    ("shuffle", True, "data.shuffle: unknown field"),
    ("global_batch_tokens", 4096 * 4, "holds fewer than batch_size_multiple=8 sequences of length 4096"),
    ("curriculum.min_seq_len", 8192, "data.curriculum.min_seq_len=8192: must be <= max_seq_len"),
    ("curriculum.step", 12, "data.curriculum.step=12: must be a positive multiple of 8"),
    ("curriculum.schedule", "cosine", "data.curriculum.schedule='cosine': must be one of"),
    ("phases", [], "data.phases=[]: needs at least one phase"),
])
def test_errors_name_the_field(path, value, message):
    with pytest.raises(ConfigError) as info:
        DataConfig.from_dict(with_(path, value))
    assert message in str(info.value)


def _per_step(sch):
    """The schedule expanded to one entry per step (small runs only)."""
    import numpy as np

    shapes = [sch.at(k) for k in range(sch.total_steps)]

    class Arrays:
        phase = np.array([s.phase for s in shapes])
        seq_len = np.array([s.seq_len for s in shapes])
        num_sequences = np.array([s.num_sequences for s in shapes])
        tokens_before = np.array([s.tokens_before for s in shapes])
        total_steps, total_tokens = sch.total_steps, sch.total_tokens

    return Arrays


def _reference(cfg):
    """The plan step by step, DeepSpeed asked at every step: what the run-length schedule must equal."""
    from data_pipeline.schedule import SeqLenCurriculum, num_sequences

    cur = SeqLenCurriculum(cfg.curriculum) if cfg.curriculum else None
    out, done = [], 0
    for p, phase in enumerate(cfg.phases):
        in_phase = 0
        while in_phase < phase.tokens:
            length = cur.seq_len(done) if cur else cfg.seq_len
            n = num_sequences(cfg, length)
            out.append((p, length, n, done))
            done += n * length
            in_phase += n * length
    return out


@pytest.mark.parametrize("curriculum", [
    None,
    {"min_seq_len": 256, "max_seq_len": 4096, "schedule": "fixed_linear", "total_tokens": 3_000_000, "step": 64},
    {"min_seq_len": 256, "max_seq_len": 4096, "schedule": "fixed_root", "total_tokens": 5_000_000, "step": 128,
     "root_degree": 3},
    # lengths that come back: the segment, not the length, decides where a run ends
    {"min_seq_len": 256, "max_seq_len": 2048, "schedule": "fixed_discrete", "seq_lens": [512, 2048, 512, 256],
     "max_tokens": [1_000_000, 1_500_000, 4_000_000]},
])
def test_run_length_schedule_equals_the_step_by_step_plan(curriculum):
    cfg = DataConfig.from_dict(with_("curriculum", curriculum))
    sch = build_schedule(cfg)
    want = _reference(cfg)
    assert sch.total_steps == len(want) and len(sch.runs) < len(want)
    got = [(s.phase, s.seq_len, s.num_sequences, s.tokens_before) for s in map(sch.at, range(sch.total_steps))]
    assert got == want


def test_a_plan_of_an_exabyte_of_tokens_stays_small():
    """10**18 tokens: the plan's size depends on phases and curriculum lengths, never on steps."""
    cfg = DataConfig.from_dict(with_("phases.0.tokens", 10**18))
    sch = build_schedule(cfg)
    assert sch.total_tokens >= 10**18 and sch.total_steps > 10**13
    assert len(sch.runs) < 200
    last = sch.at(sch.total_steps - 1)
    assert last.tokens_before + last.seq_len * last.num_sequences == sch.total_tokens


def test_schedule_counts_tokens_and_follows_deepspeed_curriculum():
    cfg = DataConfig.from_dict(with_("phases.0.tokens", 12_000_000))
    sch = _per_step(build_schedule(cfg))
    assert sch.seq_len[0] == 256 and sch.seq_len[-1] == 4096
    assert (sch.seq_len % 64 == 0).all() and (sch.num_sequences % 8 == 0).all()
    tokens = sch.seq_len * sch.num_sequences
    assert (tokens <= 65536).all() and (tokens > 65536 - 8 * sch.seq_len).all()
    # the seq len of each step is DeepSpeed's difficulty at the tokens delivered before it
    assert (sch.tokens_before[1:] == sch.tokens_before[:-1] + tokens[:-1]).all()
    for k in range(0, sch.total_steps, 37):
        done = int(sch.tokens_before[k])
        expect = min(4096, max(256, math.floor(done / 10_000_000 * (4096 - 256) + 256) // 64 * 64))
        assert sch.seq_len[k] == expect
    # each phase ends at the first step that reaches its tokens
    for p, phase in enumerate(cfg.phases):
        delivered = tokens[sch.phase == p]
        assert delivered.sum() >= phase.tokens > delivered[:-1].sum()
    assert sch.total_tokens == int(tokens.sum())


def test_allocation_within_one_sample_and_exact_over_the_phase():
    weights = [0.7 * 0.4, 0.3 * 0.4, 0.6 * 0.55, 0.6 * 0.45]
    allocated, done = [0] * 4, 0
    for step in range(500):
        n = [16, 24, 40][step % 3]
        counts = allocate(n, weights, allocated, done)
        assert sum(counts) == n
        assert all(abs(c - n * w) < 1 for c, w in zip(counts, weights))
        allocated = [a + c for a, c in zip(allocated, counts)]
        done += n
        assert all(abs(a - done * w) < 2 for a, w in zip(allocated, weights))


def test_sample_config_matches_sample_sources():
    from data_pipeline.sample_data import SOURCES

    cfg = load_data_config("configs/data/sample.yaml")
    assert sorted(cfg.sources) == sorted(SOURCES)
    assert all(p == f"data/sample/{name}" for name, p in cfg.sources.items())
    assert [p.name for p in cfg.phases] == ["pretrain", "anneal"] and cfg.phases[1].replay > 0
    sch = build_schedule(cfg)
    assert 200 <= sch.total_steps <= 1000 and 10_000_000 <= sch.total_tokens <= 50_000_000


def test_sample_docstring_extraction():
    from data_pipeline.sample_data import extract_docstrings

    text = '"""Module doc."""\nclass A:\n    """Class doc."""\n    def f(self):\n        """F doc."""\n'
    assert extract_docstrings(text) == "module:\nModule doc.\n\nA:\nClass doc.\n\nf:\nF doc."
    assert extract_docstrings("def (") is None
