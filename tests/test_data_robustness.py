"""Nothing lost or silently cut in the data pipeline: truncated inputs, out-of-range ids, hostile indexes,
a SIGTERM mid-run."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from data_helpers import make_source, random_docs
from data_pipeline.errors import DataError
from data_pipeline.readers import iter_documents
from data_pipeline.shards import INDEX_NAME, STATS_NAME, MemberReader, ShardWriter, SourceIndex, write_json_atomic
from hybrid_megatron.cli import main


def _compress(kind: str, data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data) if kind == "zst" else gzip.compress(data)


@pytest.mark.parametrize("kind", ["zst", "gz"])
@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_a_truncated_compressed_input_stops_with_exit_3_and_leaves_no_source(tmp_path, capsys, kind, fmt):
    docs = random_docs(0, 60, 3000)
    text = "".join(json.dumps({"text": d}) + "\n" for d in docs) if fmt == "jsonl" else "\n".join(docs)
    whole = _compress(kind, text.encode())
    cut = tmp_path / f"t.{fmt}.{kind}"
    cut.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    code = main(["prepare-data", "--input", str(cut), "--output", str(out), "--source", "t", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and err[-1].startswith(f"error: {cut.resolve()}: truncated"), err
    assert not out.exists() or not list(out.iterdir())  # no index.json, no stats.json, no shard


def test_a_complete_multi_frame_zst_reads_whole(tmp_path):
    text = "a" * 100_000 + "b" * 100_000
    frames = _compress("zst", text[:100_000].encode()) + _compress("zst", text[100_000:].encode())
    (tmp_path / "m.txt.zst").write_bytes(frames)
    seen = []
    assert list(iter_documents(tmp_path / "m.txt.zst", progress=seen.append)) == [text]
    assert sum(seen) == len(frames)  # progress hears of every input byte


def _source_with_ids(root: Path, ids: np.ndarray, vocab: int) -> Path:
    root.mkdir(parents=True)
    writer = ShardWriter(root, 1 << 20, vocab_size=70000)  # written with a large vocab ...
    writer.add(ids, 1)
    index = writer.finish(np.uint32, vocab - 1)
    write_json_atomic(root / STATS_NAME, {"vocab_size": vocab})  # ... recorded with a small one
    write_json_atomic(root / INDEX_NAME, index)
    return root


def test_ids_beyond_the_vocabulary_are_refused_when_written_and_when_read(tmp_path):
    ids = np.array([1, 2, 60000, 256], dtype=np.uint32)
    with pytest.raises(DataError, match="token id 60000 outside the source's vocabulary of 257"):
        ShardWriter(tmp_path / "w", 1 << 20, vocab_size=257).add(ids, 1)
    reader = MemberReader(SourceIndex.open(_source_with_ids(tmp_path / "r", ids, 257)))
    with pytest.raises(DataError, match=r"member 00000000\.tokens\.zst: token id 60000 outside .* of 257"):
        reader.read(0)


@pytest.mark.parametrize("edit,message", [
    (lambda ix: ix.pop("shards"), "no list field 'shards'"),
    (lambda ix: ix["shards"][0].update(name="../../escape.tar"), "points outside"),
    (lambda ix: ix["members"].pop("offset"), "members: no list field 'offset'"),
])
def test_a_damaged_or_hostile_index_is_one_clear_error(tmp_path, edit, message):
    root = make_source(tmp_path, "s", seed=1, num_docs=20, mean_len=400, files=1)
    index = json.loads((root / INDEX_NAME).read_text())
    edit(index)
    (root / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(DataError, match=message):
        SourceIndex.open(root)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_sigterm_to_prepare_data_ends_its_workers(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("lorem ipsum dolor sit amet " * 6_000_000)  # ~160 MB: seconds of tokenising
    proc = subprocess.Popen([sys.executable, "-m", "hybrid_megatron", "prepare-data", "--input", str(big),
                             "--output", str(tmp_path / "out"), "--source", "big", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while time.monotonic() < deadline and not workers:  # the spawned tokenizer (beside multiprocessing's tracker)
        time.sleep(0.2)
        workers = [c for c in _children(proc.pid)
                   if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes() and
                   b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert workers, "no tokenizer worker started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        time.sleep(0.1)
    alive = [w for w in workers if Path(f"/proc/{w}").exists() and
             Path(f"/proc/{w}/stat").read_text().split()[2] != "Z"]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, "tokenizer workers outlived prepare-data"
    assert not (tmp_path / "out" / INDEX_NAME).exists()
