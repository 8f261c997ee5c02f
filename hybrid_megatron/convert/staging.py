"""Conversion output that never costs the input or the previous output.

Both ``convert`` verbs write into ``<OUT>.tmp-<random>`` beside ``OUT`` and swap it in only once the
conversion has succeeded; a failure removes the staging dir and leaves ``OUT`` as it was. An output that
is, contains or lies inside the input is refused before anything is read or written. ``--overwrite``
replaces ``OUT`` as a whole, and only at the swap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import secrets
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_output(out_dir: Path, inputs: list[Path], overwrite: bool, flag: str = "--overwrite") -> None:
    """ConfigError when ``out_dir`` overlaps an input, or is not empty and ``overwrite`` is off."""
    out = Path(os.path.realpath(out_dir))
    for given in inputs:
        src = Path(os.path.realpath(given))
        if _inside(src, out) or _inside(out, src):
            what = "is" if src == out else ("contains" if _inside(src, out) else "lies inside")
            raise ConfigError(f"output {out_dir} {what} the input {given}: choose an output outside the input")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out_dir} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out_dir} exists and is not empty: pass {flag} to replace it (the whole directory, "
                          "once the new output is complete)")


@contextlib.contextmanager
def staged_output(out_dir: Path, inputs: list[Path], overwrite: bool) -> Iterator[Path]:
    """Yields an empty staging dir beside ``out_dir``; on success it becomes ``out_dir``, else it is removed."""
    out_dir = Path(out_dir)
    check_output(out_dir, inputs, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f"{out_dir.name}.tmp-{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = out_dir.parent / f"{out_dir.name}.old-{secrets.token_hex(4)}"
        os.replace(out_dir, old)  # moved aside, not deleted, until the new output is in place
    os.replace(stage, out_dir)
    if old is not None:
        shutil.rmtree(old)
        log.info("replaced the previous contents of %s", out_dir)
