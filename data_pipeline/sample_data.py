"""The sample corpus behind ``configs/tiny.yaml``, built from this Python's own standard library.

``ensure_sample_data(root)`` writes, when missing, three sources with the ``bytes`` tokenizer (no
download: every machine with Python has the corpus):

- ``code``:  library modules, one document per ``.py`` file outside ``test/`` and ``idlelib/idle_test``
- ``tests``: the standard library's test suite (``test/**.py``), one document per file
- ``docs``:  docstrings of the library's modules, classes and functions (one document per module) and
  the ``pydoc_data`` help topics (one document per topic), the "high-quality" anneal source
- ``code_val``, ``tests_val``: 2% of the ``code`` and ``tests`` documents (at least ~16), held out by content
  (``prepare-data --holdout-fraction``) for the validation loss; never in the training sources

Layout: ``<root>/raw/<source>-NN.jsonl`` (the extracted documents) and ``<root>/<source>/`` (prepare-data
output). Files that are not UTF-8 or do not parse are skipped and counted in the log. A source whose
``index.json`` exists is left as is; delete the directory to rebuild it.
"""

from __future__ import annotations

import ast
import fcntl
import json
import logging
import sysconfig
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = ("code", "tests", "docs")
RAW_PARTS = 4
# held-out validation sources (prepare-data --holdout-fraction), built with their training source
HOLDOUT = {"code": "code_val", "tests": "tests_val"}
HOLDOUT_FRACTION = 0.02
MIN_HELD_OUT = 16  # expected documents at least: a Python whose test suite is stripped still gets a validation set


def holdout_fraction(num_docs: int) -> float:
    """2% of the documents, or enough for ``MIN_HELD_OUT`` of them where the corpus is small (the hash-based
    choice then misses every document with probability about e^-16)."""
    return min(0.5, max(HOLDOUT_FRACTION, MIN_HELD_OUT / max(num_docs, 1)))


def _stdlib_files() -> tuple[list[Path], list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    code, tests = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in ("site-packages", "dist-packages") or "__pycache__" in rel:
            continue
        (tests if rel[0] == "test" or "idle_test" in rel else code).append(path)
    return code, tests


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def extract_docstrings(text: str) -> str | None:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                name = getattr(node, "name", "module")
                parts.append(f"{name}:\n{doc}")
    return "\n\n".join(parts) or None


def _write_jsonl(path: Path, docs: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _extract(raw: Path) -> None:
    import pydoc_data.topics

    code_files, test_files = _stdlib_files()
    skipped = 0
    corpus: dict[str, list[str]] = {"code": [], "tests": [], "docs": []}
    for group, files in (("code", code_files), ("tests", test_files)):
        for f in files:
            text = _read(f)
            if text is None:
                skipped += 1
                continue
            if text.strip():
                corpus[group].append(text)
            if group == "code" and text and (doc := extract_docstrings(text)):
                corpus["docs"].append(doc)
    corpus["docs"] += [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    raw.mkdir(parents=True, exist_ok=True)
    for name, docs in corpus.items():
        # a few parts per source so that prepare-data can tokenise them in parallel
        for part in range(RAW_PARTS):
            _write_jsonl(raw / f"{name}-{part:02d}.jsonl", docs[part::RAW_PARTS])
        log.info("sample data: %s: %d documents, %.1f MB of text", name, len(docs),
                 sum(len(d) for d in docs) / 1e6)
    if skipped:
        log.info("sample data: skipped %d standard-library files that are not UTF-8", skipped)


def ensure_sample_data(root: str | Path = "data/sample", workers: int = 2, progress: bool = True) -> dict[str, str]:
    """Build the sample sources under ``root`` when missing; returns ``{source name: directory}``."""
    root = Path(root)
    out = {name: str(root / name) for name in (*SOURCES, *HOLDOUT.values())}
    if not _missing(root):
        log.info("sample data: %s is complete (%s)", root, ", ".join(SOURCES))
        return out
    # two jobs started at once on a fresh machine: the second waits for the first's build, then finds
    # it complete (an exclusive lock on <root>/.build.lock; released by the OS if the builder dies)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as lock:
        if not _try_lock(lock):
            log.info("sample data: another process is building %s; waiting for it", root)
            fcntl.flock(lock, fcntl.LOCK_EX)
        _build(root, _missing(root), workers, progress)
    return out


def _missing(root: Path) -> list[str]:
    """Training sources to (re)build: missing themselves, or missing their held-out validation source."""
    return [n for n in SOURCES if not (root / n / "index.json").is_file()
            or (n in HOLDOUT and not (root / HOLDOUT[n] / "index.json").is_file())]


def _try_lock(lock) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _build(root: Path, missing: list[str], workers: int, progress: bool) -> None:
    from data_pipeline.prepare import PrepareOptions, prepare_data

    if not missing:
        return
    raw = root / "raw"
    if not all((raw / f"{n}-{RAW_PARTS - 1:02d}.jsonl").is_file() for n in SOURCES):
        log.info("sample data: extracting documents from the standard library into %s", raw)
        _extract(raw)
    for name in missing:
        log.info("sample data: preparing source %s", name)
        docs = sum(sum(1 for _ in open(f, encoding="utf-8")) for f in sorted(raw.glob(f"{name}-*.jsonl")))
        holdout = {"holdout_fraction": holdout_fraction(docs), "holdout_output": str(root / HOLDOUT[name])} \
            if name in HOLDOUT else {}
        prepare_data(PrepareOptions(inputs=[str(raw / f"{name}-*.jsonl")], output=str(root / name), source=name,
                                    tokenizer="bytes", workers=workers, overwrite=True, progress=progress,
                                    **holdout))
