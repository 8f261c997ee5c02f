"""Helpers shared by the scripts in ``tools/`` and ``benchmarks/`` and their tests: GPU process launch,
the benchmark case registry, the conversion-fixture contract and the loss-parity suites. They run from a
checkout (``pip install -e``, or the repository root on PYTHONPATH); ``REPO_ROOT`` is that checkout."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
