"""Sources read through fsspec URLs: the same batches and loader states as from local disk, byte-range reads,
one line for a missing object, retries for transient failures."""

from __future__ import annotations

import fsspec
import pytest

from data_helpers import make_source
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.loader import build_loader
from data_pipeline.shards import SourceIndex
from data_pipeline.storage import Location
from hybrid_megatron.devtools.http_server import serve_directory


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    return make_source(root, "web", seed=11, num_docs=120, mean_len=900, files=2)


def _config(source: str) -> DataConfig:
    return DataConfig.from_dict({"seed": 3, "global_batch_tokens": 2048, "seq_len": 128, "sources": {"web": source},
                                 "phases": [{"name": "pretrain", "tokens": 30000, "weights": {"web": 1.0}}],
                                 "batch_size_multiple": 4})


def _batches(source: str, steps: int = 6):
    loader = build_loader(_config(source), 0, 1)
    try:
        out = [(b.hashes, b.input_ids.tolist()) for b in (next(loader) for _ in range(steps))]
        return out, loader.state_dict()
    finally:
        loader.close()


@pytest.fixture(scope="module")
def http_url(local):
    """The source directory served over HTTP on the loopback interface for the module's tests."""
    with serve_directory(local.parent) as base:
        yield f"{base}/{local.name}"


def _to_memory(local, name: str) -> str:
    fs = fsspec.filesystem("memory")
    for f in local.iterdir():
        fs.pipe(f"/{name}/{f.name}", f.read_bytes())
    return f"memory://{name}"


def test_a_memory_url_gives_the_same_batches_and_state_as_local_disk(local):
    url = _to_memory(local, "web-mem")
    want, want_state = _batches(str(local))
    got, got_state = _batches(url)
    assert got == want
    assert {k: v for k, v in got_state.items() if k != "sources"} == {k: v for k, v in want_state.items()
                                                                        if k != "sources"}


def test_http_reads_members_by_byte_range(local, http_url):
    pytest.importorskip("aiohttp", reason="fsspec's HTTP filesystem needs aiohttp")
    ix = SourceIndex.open(http_url, "web")
    assert ix.remote and ix.num_members == SourceIndex.open(local).num_members
    want, _ = _batches(str(local), steps=3)
    got, _ = _batches(http_url, steps=3)
    assert got == want


def test_a_missing_remote_source_is_one_line_naming_the_url(http_url):
    pytest.importorskip("aiohttp", reason="fsspec's HTTP filesystem needs aiohttp")
    with pytest.raises(DataError, match=r"/nothing-here.*(does not exist|no index.json|no such object)"):
        SourceIndex.open(http_url.rsplit("/", 1)[0] + "/nothing-here", "x")


def test_transient_failures_are_retried_and_a_persistent_one_names_the_object(local, monkeypatch):
    import data_pipeline.storage as storage

    monkeypatch.setattr(storage, "BACKOFF_S", 0.0)
    location = Location(_to_memory(local, "web-flaky"))
    real, calls = location.fs.cat_file, []

    def flaky(path, *args, **kwargs):
        calls.append(path)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(location.fs, "cat_file", flaky)
    assert location.read_bytes("index.json").startswith(b"{")  # third attempt
    monkeypatch.setattr(location.fs, "cat_file", lambda *a, **k: (_ for _ in ()).throw(TimeoutError("timed out")))
    with pytest.raises(DataError, match=r"memory://web-flaky/stats.json: read failed after 3 attempts \(TimeoutError"):
        location.read_bytes("stats.json")


def test_an_unknown_protocol_is_one_line():
    with pytest.raises(DataError, match="nosuchproto://x: cannot open this URL"):
        Location("nosuchproto://x")


def _audit(source: str, tmp_path, capsys, name: str, *args: str) -> list[str]:
    import json

    from hybrid_megatron.cli import main

    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(json.dumps(_config(source).to_dict()))
    capsys.readouterr()
    assert main(["data", "audit", str(cfg), "--num-workers", "0", *args]) == 0
    return capsys.readouterr().out.splitlines()


def test_data_audit_over_http_equals_local_disk_resume_included(local, http_url, tmp_path, capsys):
    pytest.importorskip("aiohttp", reason="fsspec's HTTP filesystem needs aiohttp")
    straight = _audit(str(local), tmp_path, capsys, "local", "--steps", "8")
    assert _audit(http_url, tmp_path, capsys, "remote", "--steps", "8") == straight
    state = tmp_path / "state.json"
    first = _audit(http_url, tmp_path, capsys, "a", "--steps", "4", "--state-out", str(state))
    rest = _audit(http_url, tmp_path, capsys, "b", "--steps", "4", "--state-in", str(state))
    assert first + rest == straight


def test_a_server_that_drops_connections_is_retried_then_fails_in_one_line(local, monkeypatch):
    pytest.importorskip("aiohttp", reason="fsspec's HTTP filesystem needs aiohttp")
    import data_pipeline.storage as storage

    monkeypatch.setattr(storage, "BACKOFF_S", 0.0)
    with serve_directory(local.parent, drop_every=2) as base:  # every second connection dies
        assert SourceIndex.open(f"{base}/{local.name}", "web").num_members > 0
    with serve_directory(local.parent, drop_every=1) as base:  # every connection dies
        with pytest.raises(DataError, match=r"http://127\.0\.0\.1:\d+/web.*failed after 3 attempts"):
            SourceIndex.open(f"{base}/{local.name}", "web")


def test_a_simplecache_url_reads_through_a_local_copy(local, tmp_path):
    url = _to_memory(local, "web-cached")
    cached = f"simplecache::{url}"
    want, _ = _batches(str(local), steps=2)
    got, _ = _batches(cached, steps=2)
    assert got == want and SourceIndex.open(cached, "web").remote
