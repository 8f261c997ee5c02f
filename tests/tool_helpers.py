"""Finding the dev extra's linters (shellcheck, hadolint) next to the interpreter running the tests."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def dev_tool(name: str) -> str:
    path = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if path is None:
        pytest.fail(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return path
