"""docker/: the Dockerfile passes hadolint and keeps the base image's stack; the entrypoint dispatches.

No Docker engine runs on our machines or in CI, so the image itself is never built here: these
tests lint the Dockerfile, check the promises it makes in text, and run the entrypoint script
against a fake `hybrid-megatron`.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from tool_helpers import dev_tool

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"


def _instructions():
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_passes_hadolint():
    result = subprocess.run([dev_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_passes_shellcheck():
    result = subprocess.run([dev_tool("shellcheck"), str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_keeps_the_ngc_stack():
    lines = _instructions()
    base = next(line for line in lines if line.startswith("ARG BASE_IMAGE="))
    assert re.fullmatch(r"ARG BASE_IMAGE=nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base)
    assert lines[lines.index(base) + 1] == "FROM ${BASE_IMAGE}"
    runs = " ".join(line for line in lines if line.startswith("RUN"))
    # NVIDIA's apex ships in the base; PyPI's "apex" is an unrelated package
    assert not re.search(r"pip install[^&]*\bapex\b", runs)
    assert not re.search(r"pip install[^&]*\b(torch|transformer[-_]engine|flash[-_]attn)\b", runs)
    kernels = next(line for line in lines if "mamba-ssm==" in line)
    assert "--no-build-isolation" in kernels and "causal-conv1d==" in kernels
    assert 'TORCH_CUDA_ARCH_LIST="9.0;10.0"' in kernels and "MAX_JOBS=" in kernels
    assert re.search(r"ARG MEGATRON_CORE_VERSION=0\.19\.\d+", DOCKERFILE.read_text())
    # the pins of the base's packages are in force for every later pip install
    assert lines.index("ENV PIP_CONSTRAINT=${HM_CONSTRAINTS}") < lines.index(kernels)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert lines[-2] == 'ENTRYPOINT ["/usr/local/bin/hybrid-megatron-entrypoint"]'


def test_dockerignore_keeps_bulk_and_secrets_out():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "data", "runs", "*.sqsh", ".env"} <= ignored
    copied = {line.split()[1] for line in _instructions() if line.startswith("COPY ")}
    assert not {c.rstrip("/") for c in copied} & ignored  # nothing the build copies is ignored


@pytest.fixture
def fake_path(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "hybrid-megatron"
    fake.write_text('#!/bin/bash\nprintf "hybrid-megatron"; printf " %s" "$@"; echo\n')
    fake.chmod(0o755)
    return tmp_path, f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["pretrain", "cfg.yaml", "train.steps=2"], "hybrid-megatron pretrain cfg.yaml train.steps=2"),
        (["--help"], "hybrid-megatron --help"),
        ([], "hybrid-megatron --help"),
        # pyxis with entrypoints enabled passes srun's whole command: not doubled
        (["hybrid-megatron", "pretrain", "cfg.yaml"], "hybrid-megatron pretrain cfg.yaml"),
        (["echo", "plain", "program"], "plain program"),
    ],
)
def test_entrypoint_dispatch(fake_path, args, expected):
    tmp_path, path = fake_path
    env = dict(os.environ, PATH=path, HM_BASE_ENTRYPOINT=str(tmp_path / "absent"))
    result = subprocess.run(["bash", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_entrypoint_chains_the_base_entrypoint(fake_path):
    tmp_path, path = fake_path
    base = tmp_path / "nvidia_entrypoint.sh"
    base.write_text('#!/bin/bash\necho "base banner"\nexec "$@"\n')
    base.chmod(0o755)
    env = dict(os.environ, PATH=path, HM_BASE_ENTRYPOINT=str(base))
    result = subprocess.run(["bash", str(ENTRYPOINT), "pretrain", "c.yaml"], env=env, capture_output=True, text=True)
    assert result.stdout.splitlines() == ["base banner", "hybrid-megatron pretrain c.yaml"]
