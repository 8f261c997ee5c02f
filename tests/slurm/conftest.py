"""The ``cluster`` fixture of the SLURM script tests: a fake cluster (tests/slurm/fake_cluster.py)."""

from __future__ import annotations

import pytest

from tests.slurm.fake_cluster import cluster_at


@pytest.fixture
def cluster(tmp_path):
    yield from cluster_at(tmp_path)
