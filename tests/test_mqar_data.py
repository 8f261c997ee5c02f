"""MQAR items and the loss-mask channel: well-formed items, masks on answers only, through shards, the
loader (every DP size, resume) and the validation windows; damaged masks are one line."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.errors import ConfigError, DataError
from data_pipeline.loader import build_loader
from data_pipeline.shards import SourceIndex
from data_pipeline.streams import SourceStream
from data_pipeline.synthetic import MqarOptions, item, write_mqar
from hybrid_megatron.cli import main
from tests.data_helpers import make_source

OPTS = MqarOptions(num_kv_pairs=(2, 4, 8), seq_len=48, vocab=100, docs=2500, seed=3)


def test_every_answer_is_the_value_bound_to_its_key_earlier_in_the_item():
    for i in range(300):
        toks, mask, n = item(OPTS, i)
        assert n == OPTS.num_kv_pairs[i % 3] and toks.size == mask.size == OPTS.seq_len
        keys, values = toks[0:2 * n:2], toks[1:2 * n:2]
        assert len(set(keys.tolist())) == n and keys.max() < OPTS.num_keys <= values.min() and values.max() < OPTS.pad_id
        bound = dict(zip(keys.tolist(), values.tolist()))
        q0 = OPTS.seq_len - 1 - 2 * n
        queries, answers = toks[q0:-1:2], toks[q0 + 1:-1:2]
        assert sorted(queries.tolist()) == sorted(keys.tolist())
        assert [bound[q] for q in queries.tolist()] == answers.tolist()
        assert np.flatnonzero(mask).tolist() == list(range(q0 + 1, OPTS.seq_len - 1, 2))
        assert (toks[2 * n:q0] == OPTS.pad_id).all() and toks[-1] == OPTS.eos_id
        assert (toks[:-1] != OPTS.eos_id).all()
    a, b = item(OPTS, 17), item(OPTS, 17)
    assert (a[0] == b[0]).all() and not (item(OPTS, 18)[0][:4] == a[0][:4]).all()


@pytest.fixture(scope="module")
def mqar(tmp_path_factory):
    root = tmp_path_factory.mktemp("mqar")
    write_mqar(root / "train", OPTS, progress=False)
    val = MqarOptions(num_kv_pairs=OPTS.num_kv_pairs, seq_len=OPTS.seq_len, vocab=OPTS.vocab, docs=600, seed=4)
    write_mqar(root / "val", val, progress=False)
    return root


def test_the_stream_gives_each_items_tokens_and_mask_across_members(mqar):
    index = SourceIndex.open(mqar / "train")
    assert index.has_masks and index.num_members == 3  # 1024 items a member
    stream = SourceStream("train", index, seed=0)
    order, starts = stream.layout.epoch(0)
    member = int(order[1])
    first_item = member * 1024
    toks, mask = np.empty(3 * OPTS.seq_len, np.int64), np.empty(3 * OPTS.seq_len, np.uint8)
    stream.read_into(toks, int(starts[1]) - OPTS.seq_len, mask)  # the last item before it, then two of it
    for k, i in enumerate((first_item, first_item + 1)):
        want_toks, want_mask, _ = item(OPTS, i)
        got = slice((k + 1) * OPTS.seq_len, (k + 2) * OPTS.seq_len)
        assert (toks[got] == want_toks).all() and (mask[got] == want_mask).all()
    stream.close()


def _config(mqar, **over) -> DataConfig:
    d = {"seed": 5, "global_batch_tokens": 8 * 48, "seq_len": 48, "sources": {"mqar": str(mqar / "train")},
         "phases": [{"name": "mqar", "tokens": 20 * 8 * 48, "weights": {"mqar": 1.0}}], "batch_size_multiple": 4,
         "validation": {"sources": {"mqar_val": str(mqar / "val")}, "tokens": 8 * 48}}
    d.update(over)
    return DataConfig.from_dict(d)


def test_the_loss_mask_trains_answers_only_at_every_dp_size_and_after_a_resume(mqar):
    config = _config(mqar)
    answers = set(range(OPTS.num_keys, OPTS.pad_id))
    with build_loader(config) as loader:
        straight = list(loader)
    for b in straight:
        trained = b.labels[b.loss_mask == 1]
        assert trained.size and set(trained.tolist()) <= answers
        # an answer label follows its query key, which follows the previous answer or the PAD run
        assert (b.input_ids[b.loss_mask == 1] < OPTS.num_keys).all()
    total = sum(int(b.loss_mask.sum()) for b in straight)
    assert 0 < total < sum(b.loss_mask.size for b in straight) / 4
    for dp in (2, 4):
        loaders = [build_loader(config, r, dp) for r in range(dp)]
        for s, whole in enumerate(straight):
            parts = [next(ld) for ld in loaders]
            assert (np.concatenate([p.loss_mask for p in parts]) == whole.loss_mask).all(), (dp, s)
        for ld in loaders:
            ld.close()
    with build_loader(config) as first:
        for _ in range(7):
            next(first)
        state = first.state_dict()
    with build_loader(config) as resumed:
        resumed.load_state_dict(state)
        for b in list(resumed):
            assert (b.loss_mask == straight[b.step].loss_mask).all() and b.hashes == straight[b.step].hashes


def test_validation_windows_carry_the_mask(mqar):
    from data_pipeline.validation import ValidationSet

    (batch,) = list(ValidationSet(_config(mqar), 0, 1, 48).batches())
    assert set(batch.labels[batch.loss_mask == 1].tolist()) <= set(range(OPTS.num_keys, OPTS.pad_id))
    assert 0 < batch.loss_mask.sum() < batch.loss_mask.size / 4


def test_a_source_without_masks_gives_all_ones_and_cannot_mix_with_mqar(mqar, tmp_path):
    plain = make_source(tmp_path, "plain", 1, num_docs=60, mean_len=200)
    stream = SourceStream("plain", SourceIndex.open(plain), 0)
    toks, mask = np.empty(300, np.int64), np.zeros(300, np.uint8)
    stream.read_into(toks, 5, mask)
    assert not stream.has_masks and (mask == 1).all()
    stream.close()
    config = _config(mqar, sources={"mqar": str(mqar / "train"), "plain": str(plain)},
                     phases=[{"name": "p", "tokens": 8 * 8 * 48, "weights": {"mqar": 0.5, "plain": 0.5}}],
                     validation=None)
    with pytest.raises(ConfigError, match="different tokenizers"):  # MQAR ids mean nothing to a text tokenizer
        build_loader(config)


def test_a_damaged_mask_is_one_line(mqar, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(mqar / "train", bad)
    index = SourceIndex.open(bad)
    shard = bad / index.shard_names[0]
    data = bytearray(shard.read_bytes())
    off = int(index.member_mask_offset[0])
    data[off:off + 8] = b"\xff" * 8
    shard.write_bytes(bytes(data))
    stream = SourceStream("bad", SourceIndex.open(bad), 0)
    toks, mask = np.empty(index.num_tokens, np.int64), np.empty(index.num_tokens, np.uint8)
    with pytest.raises(DataError, match="mask of member 00000000.tokens.zst: corrupt zstd data"):
        stream.read_into(toks, 0, mask)


def test_prepare_data_synthetic_cli(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["prepare-data", "--synthetic", "mqar", "--num-kv-pairs", "4,8", "--seq-len", "64", "--vocab", "128",
                 "--docs", "10", "--output", str(out), "--no-progress"]) == 0
    assert "10 mqar items" in capsys.readouterr().out
    for argv, message in (
        (["--num-kv-pairs", "4,x"], "--num-kv-pairs '4,x': expected comma-separated positive integers"),
        (["--seq-len", "16", "--num-kv-pairs", "8"], "--seq-len 16: too short for 8 key-value pairs"),
        (["--vocab", "10", "--num-kv-pairs", "8"], "--vocab 10: 4 keys cannot give 8 distinct keys"),
        (["--input", "x.txt"], "--synthetic writes its own items"),
    ):
        assert main(["prepare-data", "--synthetic", "mqar", "--output", str(tmp_path / "o"), *argv]) == 2
        assert message in capsys.readouterr().err


def test_the_mqar_configs_match_in_non_embedding_parameters_within_1_percent():
    from hybrid_megatron.config import load_run_config
    from hybrid_megatron.devtools import REPO_ROOT
    from hybrid_megatron.model.build import padded_vocab_size
    from hybrid_megatron.model.flops import embedding_params, num_parameters

    counts = {}
    for arch in ("attention", "mamba", "hybrid"):
        cfg = load_run_config(REPO_ROOT / "configs" / "mqar" / f"{arch}.yaml")
        padded = padded_vocab_size(cfg.model.vocab_size, cfg.model, 1)
        counts[arch] = num_parameters(cfg.model, padded) - embedding_params(cfg.model, padded)
        assert cfg.data.sources == {"mqar": "data/mqar/train"} and cfg.model.vocab_size == 2048 and cfg.model.tie_embeddings
    assert set(load_run_config(REPO_ROOT / "configs" / "mqar" / "hybrid.yaml").model.hybrid_layer_pattern) == {"M", "*", "-"}
    assert max(counts.values()) / min(counts.values()) < 1.01, counts
