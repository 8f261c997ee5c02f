"""Paired-outcome statistics and text statistics of the diagnostics suites, against reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hybrid_megatron.eval import paired


def _reference_p(b: int, c: int) -> float:
    """Two-sided exact binomial test of b successes in b + c trials at p = 1/2, by enumerating every outcome
    no more likely than the observed one (the definition scipy's binomtest uses)."""
    n = b + c
    if n == 0:
        return 1.0
    probs = [math.comb(n, i) / 2**n for i in range(n + 1)]
    observed = probs[b]
    return min(1.0, sum(p for p in probs if p <= observed * (1 + 1e-7)))


@pytest.mark.parametrize("b, c", [(0, 0), (5, 5), (12, 3), (3, 12), (40, 22), (0, 9), (250, 200)])
def test_mcnemar_matches_the_exact_binomial_test(b, c):
    first = [True] * b + [False] * c + [True] * 30 + [False] * 7
    second = [False] * b + [True] * c + [True] * 30 + [False] * 7
    out = paired.mcnemar_exact(first, second)
    assert (out["b"], out["c"], out["n"]) == (b, c, b + c + 37)
    assert out["p_value"] == pytest.approx(_reference_p(b, c), rel=1e-9)


def test_mcnemar_matches_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        first, second = rng.random(500) < 0.7, rng.random(500) < 0.6
        out = paired.mcnemar_exact(first.tolist(), second.tolist())
        ref = stats.binomtest(out["b"], out["b"] + out["c"], 0.5).pvalue if out["b"] + out["c"] else 1.0
        assert out["p_value"] == pytest.approx(ref, rel=1e-9)


def test_mcnemar_refuses_unpaired_lists():
    with pytest.raises(ValueError, match="different lengths"):
        paired.mcnemar_exact([True], [True, False])


def test_reliance_and_text_statistics():
    assert paired.reliance(0.8, 0.2) == pytest.approx(0.75) and paired.reliance(0.0, 0.0) is None
    assert paired.reliance(0.5, 0.6) == pytest.approx(-0.2)  # the cut helped: negative reliance, not clipped
    assert paired.distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert paired.distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert paired.repetition_rate([7, 7, 7, 7, 7, 7], n=2) == pytest.approx(1 - 1 / 5)
    assert paired.repetition_rate(list(range(300)), n=4) == 0.0
    loop = [1, 2, 3] * 100
    assert paired.repetition_rate(loop, n=4, first=200) == pytest.approx(1 - 3 / 197)


def test_the_ssm_cut_restarts_mamba_at_the_query_and_leaves_attention_alone():
    from data_pipeline.packing import build_arrays
    from hybrid_megatron.eval.cuts import cut_seq_idx, ssm_cut

    eos = 99
    rows = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],       # one document
                     [1, 2, eos, 4, 5, 6, 7, 8, 9, 10, 11]])    # a second document starts at position 3
    arrays = build_arrays(rows, eos, True, False)
    seq_idx = arrays["seq_idx"]
    out = ssm_cut(seq_idx, np.array([6, 7]))
    mamba_idx, mamba_cu = out["mamba"]
    assert mamba_idx.tolist() == [[0, 0, 0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]]
    assert mamba_cu.tolist() == [0, 6, 10, 13, 17, 20]            # rows flattened: 10 tokens each
    attn_idx, attn_cu = out["attention"]
    assert attn_idx.tolist() == seq_idx.tolist() and attn_cu.tolist() == [0, 10, 13, 20]
    # no cut, a cut at 0 and a cut at an existing document start change nothing
    for cuts in ([-1, -1], [0, 3]):
        assert cut_seq_idx(seq_idx, np.array(cuts)).tolist() == seq_idx.tolist()
    with pytest.raises(ValueError, match="must lie in"):
        cut_seq_idx(seq_idx, np.array([10, 0]))
