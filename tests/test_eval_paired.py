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


def _brute_force_p(d: list[int]) -> float:
    """P[|sum s_k d_k| >= |sum d_k|] over every one of the 2^K sign patterns, counted one by one."""
    observed = abs(sum(d))
    hits = sum(abs(sum(x if (mask >> k) & 1 else -x for k, x in enumerate(d))) >= observed
               for mask in range(2 ** len(d)))
    return hits / 2 ** len(d)


def _items(d: list[int], width: int, agree: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes [items, width] whose per-item discordance b_k - c_k is d[k], with ``agree`` answers right in both."""
    first = np.zeros((len(d), width), dtype=bool)
    second = np.zeros_like(first)
    for k, x in enumerate(d):
        (first if x > 0 else second)[k, :abs(x)] = True
        first[k, width - agree:] = second[k, width - agree:] = True
    return first, second


def test_the_item_test_is_the_exact_sign_flip_distribution():
    rng = np.random.default_rng(1)
    for _ in range(30):
        d = rng.integers(-5, 6, size=int(rng.integers(1, 13))).tolist()
        out = paired.mcnemar_items(*_items(d, 8))
        assert out["method"] == "exact" and out["items"] == len(d)
        assert (out["b"], out["c"]) == (sum(x for x in d if x > 0), -sum(x for x in d if x < 0))
        assert out["p_value"] == pytest.approx(_brute_force_p(d), rel=1e-12, abs=1e-15), d


def test_with_one_answer_per_item_the_item_test_is_mcnemars():
    rng = np.random.default_rng(2)
    for _ in range(20):
        first, second = rng.random((300, 1)) < 0.6, rng.random((300, 1)) < 0.5
        assert paired.mcnemar_items(first, second)["p_value"] == pytest.approx(
            paired.mcnemar_exact(first.ravel().tolist(), second.ravel().tolist())["p_value"], rel=1e-9)


def test_answers_that_move_together_count_once_per_item():
    """14 items wrong under the cut in all 8 answers, 6 the other way: over answers 112 against 48 looks
    decisive, but it is 14 items against 6, the sign test's binomial."""
    first, second = _items([8] * 14 + [-8] * 6, 8, agree=0)
    per_answer = paired.mcnemar_exact(first.ravel().tolist(), second.ravel().tolist())["p_value"]
    per_item = paired.mcnemar_items(first, second)["p_value"]
    assert per_item == pytest.approx(_reference_p(14, 6), rel=1e-9)  # 0.115
    assert per_answer < 1e-6 < 0.1 < per_item


def test_large_evaluations_use_the_normal_approximation(monkeypatch):
    rng = np.random.default_rng(3)
    d = (rng.integers(-3, 4, size=2000) + (rng.random(2000) < 0.15)).tolist()  # a lean to the first: p ~ 0.017
    first, second = _items(d, 8)
    exact = paired.mcnemar_items(first, second)
    monkeypatch.setattr(paired, "EXACT_WORK", 0)
    approx = paired.mcnemar_items(first, second)
    assert exact["method"] == "exact" and approx["method"] == "normal"
    assert 1e-4 < exact["p_value"] < 0.2 and approx["p_value"] == pytest.approx(exact["p_value"], rel=0.05)


def test_no_discordance_and_bad_shapes():
    same = np.ones((5, 3), dtype=bool)
    assert paired.mcnemar_items(same, same)["p_value"] == 1.0
    balanced = _items([2, -2], 4)
    assert paired.mcnemar_items(*balanced)["p_value"] == 1.0
    with pytest.raises(ValueError, match="one shape"):
        paired.mcnemar_items(same, same[:4])
    with pytest.raises(ValueError, match="one shape"):
        paired.mcnemar_items(same.ravel(), same.ravel())


def test_outcomes_pack_to_hex_per_item_and_back():
    rng = np.random.default_rng(4)
    right = rng.random((50, 37)) < 0.3
    packed = paired.pack_outcomes(right)
    assert len(packed) == 50 and all(isinstance(p, str) for p in packed)
    assert paired.pack_outcomes(np.array([[True, False, True, True]])) == ["d"]
    assert (paired.unpack_outcomes(packed, 37) == right).all()
    assert paired.unpack_outcomes([], 4).shape == (0, 4)
    with pytest.raises(ValueError, match="item 1: 'zz' is not a hex"):
        paired.unpack_outcomes(["1", "zz"], 4)
    with pytest.raises(ValueError, match="past the item's 4"):
        paired.unpack_outcomes(["10"], 4)


def test_reliance_and_text_statistics():
    from hybrid_megatron.eval.text_suites import distinct_n, repetition_rate

    assert paired.reliance(0.8, 0.2) == pytest.approx(0.75) and paired.reliance(0.0, 0.0) is None
    assert paired.reliance(0.5, 0.6) == pytest.approx(-0.2)  # the cut helped: negative reliance, not clipped
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert repetition_rate([7, 7, 7, 7, 7, 7], n=2) == pytest.approx(1 - 1 / 5)
    assert repetition_rate(list(range(300)), n=4) == 0.0
    loop = [1, 2, 3] * 100
    assert repetition_rate(loop, n=4, first=200) == pytest.approx(1 - 3 / 197)


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
