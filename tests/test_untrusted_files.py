"""Files a user downloads never run code: crafted ``.metadata`` and RNG files on every path that reads them.

Each crafted file would create a marker file when unpickled by plain pickle; every test asserts the
marker is absent and that the reader stopped with one line naming the file.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_megatron.cli import main
from hybrid_megatron.devtools import REPO_ROOT

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "convert" / "tp1" / "ckpt"


class _Exploit:
    """Unpickling this runs ``touch <marker>`` through os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    save_dir = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, save_dir)
    marker = tmp_path / "PWNED"
    (save_dir / "step-000000" / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    return save_dir, marker


def test_the_crafted_file_really_runs_under_plain_pickle(tmp_path):
    """The test's own premise: without the guard the marker appears."""
    save_dir, marker = _crafted_checkpoint(tmp_path)
    pickle.loads((save_dir / "step-000000" / ".metadata").read_bytes())
    assert marker.exists()


def test_convert_to_hf_refuses_a_crafted_metadata(tmp_path, capsys):
    save_dir, marker = _crafted_checkpoint(tmp_path)
    assert main(["convert", "to-hf", str(save_dir), str(tmp_path / "out"), "--no-progress"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ".metadata: refuses to load posix.system" in err[0], err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_inspect_checkpoint_refuses_a_crafted_metadata(tmp_path):
    save_dir, marker = _crafted_checkpoint(tmp_path)
    proc = subprocess.run([sys.executable, "tools/inspect_checkpoint.py", str(save_dir)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and "refuses to load posix.system" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x05garbage", None])
def test_garbage_or_truncated_metadata_is_one_line(tmp_path, capsys, content):
    save_dir = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, save_dir)
    meta = save_dir / "step-000000" / ".metadata"
    meta.write_bytes(meta.read_bytes()[: len(meta.read_bytes()) // 2] if content is None else content)
    assert main(["convert", "to-hf", str(save_dir), str(tmp_path / "out"), "--no-progress"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable torch_dist metadata file" in err[0], err


def test_a_truncated_shard_is_one_line_and_keeps_the_previous_export(tmp_path, capsys):
    good, out = tmp_path / "good", tmp_path / "out"
    shutil.copytree(FIXTURE, good)
    assert main(["convert", "to-hf", str(good), str(out), "--no-progress"]) == 0
    before = sorted(p.name for p in out.iterdir())
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURE, bad)
    shard = bad / "step-000000" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    capsys.readouterr()
    assert main(["convert", "to-hf", str(bad), str(out), "--overwrite", "--no-progress"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated or corrupt" in err[0], err
    assert sorted(p.name for p in out.iterdir()) == before  # the previous export is untouched
    assert not list(tmp_path.glob("out.tmp-*"))


def test_rng_states_round_trip_through_the_safe_loader_and_a_crafted_one_is_refused(tmp_path):
    import random

    import numpy as np
    import torch

    from data_pipeline.errors import DataError
    from hybrid_megatron.checkpoint import rng

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    rng.save(tmp_path / "rank-00000.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    rng.restore(rng.load(tmp_path / "rank-00000.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want

    marker = tmp_path / "PWNED"
    torch.save({"python": _Exploit(marker)}, tmp_path / "crafted.pt")
    with pytest.raises(DataError, match="crafted.pt: not a readable RNG state"):
        rng.load(tmp_path / "crafted.pt")
    assert not marker.exists()
