"""prepare-data: formats in, shard layout out, determinism, tokenizers, refusals; the CLI verbs."""

from __future__ import annotations

import gzip
import json
import subprocess
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import zstandard

from data_pipeline.errors import ConfigError, DataError
from data_pipeline.prepare import PrepareOptions, prepare_data
from data_pipeline.shards import MemberReader, SourceIndex
from hybrid_megatron.cli import main
from tests.data_helpers import random_docs, write_jsonl


def _prep(inputs, out, **kw):
    opts = dict(source="s", tokenizer="bytes", member_tokens=65536, workers=1, progress=False)
    opts.update(kw)
    return prepare_data(PrepareOptions(inputs=[str(i) for i in inputs], output=str(out), **opts))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = random_docs(5, 240, 1500)
    for i in range(4):
        write_jsonl(root / f"p{i}.jsonl", docs[i::4])
    return root, docs


def test_layout_members_and_webdataset(corpus, tmp_path):
    root, docs = corpus
    stats = _prep([root / "*.jsonl"], tmp_path / "out", shard_bytes=200_000)
    ix = SourceIndex.open(tmp_path / "out")
    assert stats["documents"] == len(docs) and stats["tokens"] == ix.num_tokens
    assert stats["tokens"] == sum(len(d.encode()) + 1 for d in docs)
    assert stats["vocab_size"] == 257 and stats["tokenizer"]["kind"] == "bytes" and stats["shards"] > 1
    assert (ix.member_tokens[:-1] >= 65536).all()
    # every member decodes to whole documents ending in EOS, via the index and via webdataset
    reader = MemberReader(ix)
    via_index = [reader.read(m) for m in range(ix.num_members)]
    assert all(t[-1] == 256 for t in via_index)
    assert sum(int((t == 256).sum()) for t in via_index) == len(docs)
    via_wds = [np.frombuffer(zstandard.ZstdDecompressor().decompress(s["tokens.zst"]), "<u2")
               for s in wds.WebDataset([str(p) for p in ix.shard_paths], shardshuffle=False)]
    assert len(via_wds) == ix.num_members and all((a == b).all() for a, b in zip(via_index, via_wds))
    listing = subprocess.run(["tar", "-tf", str(ix.shard_paths[0])], capture_output=True, text=True, check=True)
    assert listing.stdout.split()[0] == "00000000.tokens.zst"
    with tarfile.open(ix.shard_paths[0]) as tf:
        assert [m.offset_data for m in tf.getmembers()] == list(ix.member_offset[ix.member_shard == 0])
    # in file-name order: the stream of the first member starts with the first document of p0
    assert bytes(via_index[0][: len(docs[0])].astype(np.uint8)) == docs[0].encode()


def test_deterministic_over_workers_and_refuses_rerun(corpus, tmp_path):
    root, _ = corpus
    _prep([root / "*.jsonl"], tmp_path / "one", workers=1)
    _prep([root / "*.jsonl"], tmp_path / "two", workers=2)
    for name in ("shard-000000.tar", "index.json", "stats.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    with pytest.raises(ConfigError, match="not empty .*--overwrite"):
        _prep([root / "*.jsonl"], tmp_path / "one")
    _prep([root / "p0.jsonl"], tmp_path / "one", overwrite=True)
    assert not (tmp_path / "one" / "shard-000001.tar").exists()


def test_input_formats(tmp_path):
    docs = ["first doc", "zweites Dokument \u00fc", "third"]
    (tmp_path / "a.txt").write_text(docs[0])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": docs[1]}) + "\n\n")
    pq.write_table(pa.table({"body": [docs[2], None]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b""))
    stats = _prep([tmp_path / "a.txt", tmp_path / "b.jsonl.gz", tmp_path / "c.parquet", tmp_path / "d.txt.zst"],
                  tmp_path / "out", text_field="body")
    tokens = MemberReader(SourceIndex.open(tmp_path / "out")).read(0)
    expect = b"".join(d.encode() + b"\x00" for d in docs)
    assert stats["empty_documents_skipped"] == 1 and stats["documents"] == 3
    assert bytes(np.where(tokens == 256, 0, tokens).astype(np.uint8)) == expect


def test_bad_inputs_name_the_file(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        _prep([tmp_path / "bad.jsonl"], tmp_path / "o1")
    (tmp_path / "nofield.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match=r"nofield.jsonl:1: no string field 'text'"):
        _prep([tmp_path / "nofield.jsonl"], tmp_path / "o2")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ConfigError, match="x.csv: unsupported input"):
        _prep([tmp_path / "x.csv"], tmp_path / "o3")
    with pytest.raises(ConfigError, match="matches no file"):
        _prep([tmp_path / "none*.jsonl"], tmp_path / "o4")
    with pytest.raises(ConfigError, match="--member-tokens 100"):
        _prep([tmp_path / "bad.jsonl"], tmp_path / "o5", member_tokens=100)


def test_hf_tokenizer_trained_locally(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs = random_docs(9, 200, 400) + ["a literal </s> stays text"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path / "tok")
    write_jsonl(tmp_path / "in.jsonl", docs)
    stats = _prep([tmp_path / "in.jsonl"], tmp_path / "out", tokenizer=str(tmp_path / "tok"), workers=2)
    eos = tok.token_to_id("</s>")
    assert stats["eos_id"] == eos and stats["vocab_size"] == tok.get_vocab_size()
    assert stats["tokenizer"]["kind"] == "hf"
    ix = SourceIndex.open(tmp_path / "out")
    tokens = np.concatenate([MemberReader(ix).read(m) for m in range(ix.num_members)])
    assert int((tokens == eos).sum()) == len(docs)  # only the appended EOS, never the literal in the text
    first = tokens[: np.flatnonzero(tokens == eos)[0]]
    assert tok.decode(first.tolist()) == tok.decode(tok.encode(docs[0]).ids)


def test_cli_prepare_and_audit_resume(corpus, tmp_path, capsys):
    root, _ = corpus
    srcs = {}
    for name, files in (("a", "p[01].jsonl"), ("b", "p2.jsonl"), ("c", "p3.jsonl")):
        args = ["prepare-data", "--input", str(root / files), "--output", str(tmp_path / name), "--source", name,
                "--tokenizer", "bytes", "--member-tokens", "65536", "--no-progress"]
        assert main(args) == 0
        srcs[name] = str(tmp_path / name)
    assert main(args) == 2  # rerun into a non-empty output
    assert "not empty" in capsys.readouterr().err
    cfg = {"seed": 3, "global_batch_tokens": 2048, "seq_len": 128, "sources": srcs, "batch_size_multiple": 4,
           "phases": [{"name": "pretrain", "tokens": 20000, "weights": {"a": 2, "b": 1}},
                      {"name": "anneal", "tokens": 8000, "weights": {"c": 1}, "replay": 0.25}]}
    (tmp_path / "data.yaml").write_text(json.dumps(cfg))
    audit = ["data", "audit", str(tmp_path / "data.yaml"), "--dp-size", "2"]
    assert main(audit + ["--steps", "20"]) == 0
    straight = capsys.readouterr().out.splitlines()
    assert main(audit + ["--steps", "6", "--state-out", str(tmp_path / "st.json")]) == 0
    head = capsys.readouterr().out.splitlines()
    assert main(audit + ["--steps", "14", "--state-in", str(tmp_path / "st.json")]) == 0
    assert head + capsys.readouterr().out.splitlines() == straight
    line = json.loads(straight[0])
    assert set(line) >= {"step", "dp_rank", "phase", "seq_len", "tokens", "tokens_by_source", "samples"}
    cfg["seed"] = 4
    (tmp_path / "other.yaml").write_text(json.dumps(cfg))
    assert main(["data", "audit", str(tmp_path / "other.yaml"), "--steps", "1", "--state-in",
                 str(tmp_path / "st.json")]) == 2
    assert "refusing to resume" in capsys.readouterr().err
    cfg["phases"][1]["replay"] = 1.2
    (tmp_path / "bad.yaml").write_text(json.dumps(cfg))
    assert main(["data", "audit", str(tmp_path / "bad.yaml"), "--steps", "1"]) == 2
    assert "error: data.phases[1].replay=1.2: must be in [0, 1)" in capsys.readouterr().err


def test_sample_data_built_once_by_concurrent_jobs(tmp_path):
    """Two jobs started together on a fresh machine: one builds the sample corpus, the other waits for
    it and uses it (without the lock both would write the same shards at once)."""
    import sys
    from pathlib import Path

    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
            "from data_pipeline.sample_data import ensure_sample_data\n"
            f"ensure_sample_data({str(tmp_path / 'sample')!r}, progress=False)")
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum(log.count("extracting documents") for log in logs) == 1, logs
    for name in ("code", "tests", "docs"):
        assert SourceIndex.open(tmp_path / "sample" / name).num_tokens > 0
