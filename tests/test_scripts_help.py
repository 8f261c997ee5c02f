"""Every script in benchmarks/ and tools/ imports and parses its arguments on a CPU: a GPU call that fails
on an import or a typo costs device time, this costs seconds."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hybrid_megatron.devtools import REPO_ROOT

SCRIPTS = sorted(p for folder in ("benchmarks", "tools") for p in (REPO_ROOT / folder).glob("*.py")
                 if '__name__ == "__main__"' in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_script_answers_help(script):
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
