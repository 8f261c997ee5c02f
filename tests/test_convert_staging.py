"""Conversion never destroys its input or a previous good output (convert/staging.py)."""

from __future__ import annotations

import shutil

import pytest

from hybrid_megatron.cli import main
from hybrid_megatron.convert.testing import random_nemotron_h
from hybrid_megatron.devtools import REPO_ROOT

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "convert" / "tp1" / "ckpt"


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_to_hf_into_the_run_dir_holding_the_checkpoint_is_refused_and_nothing_is_lost(tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(FIXTURE, run / "checkpoints")
    before = _tree(run)
    assert main(["convert", "to-hf", str(run / "checkpoints"), str(run), "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: output {run} contains the input {run / 'checkpoints'}: choose an output outside the input"]
    assert _tree(run) == before


@pytest.mark.parametrize("where", ["same", "inside"])
def test_to_hf_output_equal_to_or_inside_the_checkpoint_is_refused(tmp_path, capsys, where):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, ckpt)
    out = ckpt if where == "same" else ckpt / "step-000000" / "hf"
    before = _tree(ckpt)
    assert main(["convert", "to-hf", str(ckpt), str(out), "--overwrite", "--no-progress"]) == 2
    assert "the input" in capsys.readouterr().err and _tree(ckpt) == before


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("staging") / "hf"
    random_nemotron_h(seed=1).save_pretrained(path)
    return path


def test_from_hf_onto_its_own_input_is_refused(hf_dir, capsys):
    before = _tree(hf_dir)
    assert main(["convert", "from-hf", str(hf_dir), str(hf_dir), "--overwrite"]) == 2
    assert "is the input" in capsys.readouterr().err and _tree(hf_dir) == before


def test_a_failed_from_hf_keeps_the_previous_checkpoint(hf_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["convert", "from-hf", str(hf_dir), str(out), "--dtype", "fp32"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    shard = next(broken.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated download
    capsys.readouterr()
    assert main(["convert", "from-hf", str(broken), str(out), "--overwrite"]) == 3
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob("ckpt.tmp-*"))
