"""studies.stats against scipy and hand computations on fixed numbers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from flatminima.studies.stats import (
    add_table_tests,
    holm,
    paired_test,
    sign_flip_p,
    tost_p,
    verdict,
)


def test_sign_flip_exact_small_cases_by_hand():
    # n = 5, all positive: only the all-plus and all-minus patterns reach |sum| -> 2/32
    assert sign_flip_p([0.1, 0.2, 0.3, 0.4, 0.5]) == 0.0625
    assert sign_flip_p([-1.0, -2.0, -3.0]) == 0.25
    # d = (1, 2, -3): |sum| = 0, every pattern reaches it
    assert sign_flip_p([1.0, 2.0, -3.0]) == 1.0
    # d = (1, 1, 4): the 8 pattern sums are +-6, +-4, +-4, +-2 -> |s| >= 6 in 2 of 8
    assert sign_flip_p([1.0, 1.0, 4.0]) == 0.25
    # d = (1, 3, 4, -1): observed |sum| = 7; brute force below
    d = [1.0, 3.0, 4.0, -1.0]
    sums = [abs(sum(s * x for s, x in zip(e, d))) for e in itertools.product((-1, 1), repeat=4)]
    assert sign_flip_p(d) == sum(s >= 7 for s in sums) / 16 == 6 / 16  # 7, 9, 7 and negatives


def test_sign_flip_matches_scipy_permutation_test():
    rng = np.random.default_rng(0)
    d = rng.normal(0.3, 1.0, size=12)
    ref = stats.permutation_test(
        (d,), np.mean, permutation_type="samples", n_resamples=np.inf, alternative="two-sided"
    ).pvalue
    assert sign_flip_p(d) == pytest.approx(ref, rel=1e-12)
    # above the exact limit: a Monte Carlo estimate close to the exact value
    d25 = rng.normal(0.4, 1.0, size=22)
    exact = sign_flip_p(d25[:20])
    assert 0 < sign_flip_p(d25, n_resamples=20000) <= 1 and 0 < exact <= 1
    with pytest.raises(ValueError, match="NaN"):
        sign_flip_p([0.1, math.nan])


def test_holm_on_a_fixed_vector_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x -> 0.02, 0.03, 0.06, max(0.06, 0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    out = holm([0.02, math.nan, 0.04])  # NaN does not count: m = 2
    assert out[0] == pytest.approx(0.04) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    assert holm([]) == []


def test_holm_matches_statsmodels_style_reference():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 0.2, size=7)
    order = np.argsort(p)
    ref = np.empty(7)
    running = 0.0
    for i, j in enumerate(order):  # the definition, written out independently
        running = max(running, min(1.0, (7 - i) * p[j]))
        ref[j] = running
    assert holm(p) == pytest.approx(ref.tolist(), abs=1e-14)


def test_tost_by_hand_and_against_two_scipy_one_sided_tests():
    d = np.array([0.001, -0.001, 0.002, 0.0])
    mean, se = d.mean(), d.std(ddof=1) / 2
    hand = max(stats.t.sf((mean + 0.003) / se, 3), stats.t.cdf((mean - 0.003) / se, 3))
    assert tost_p(d, 0.003) == pytest.approx(hand, rel=1e-12)
    lo = stats.ttest_1samp(d, -0.003, alternative="greater").pvalue
    hi = stats.ttest_1samp(d, 0.003, alternative="less").pvalue
    assert tost_p(d, 0.003) == pytest.approx(max(lo, hi), rel=1e-10)
    # a clear difference is never equivalent; a tiny margin neither
    assert tost_p([0.02, 0.03, 0.025, 0.02], 0.003) > 0.5
    assert tost_p(d, 1e-6) > 0.5
    with pytest.raises(ValueError, match="margin"):
        tost_p(d, 0.0)
    assert math.isnan(tost_p([0.1], 0.3))


def test_paired_test_against_scipy():
    a = [0.10, 0.20, 0.15, 0.30, 0.22, 0.18]
    b = [0.12, 0.25, 0.13, 0.31, 0.26, 0.21]
    r = paired_test(a, b, margin=0.003)
    d = np.subtract(a, b)
    assert r["n"] == 6 and r["mean"] == pytest.approx(d.mean())
    assert r["p_t"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-10)
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert r["p_perm"] == pytest.approx(sign_flip_p(d))
    assert r["p_tost"] == pytest.approx(tost_p(d, 0.003))
    # a NaN pair (a diverged seed) is dropped
    r2 = paired_test([*a, math.nan], [*b, 0.1])
    assert r2["n"] == 6 and r2["p_t"] == pytest.approx(r["p_t"])
    assert math.isnan(r2["p_tost"])  # no margin given
    assert math.isnan(paired_test([0.1], [0.2])["p_t"])
    with pytest.raises(ValueError, match="equal lengths"):
        paired_test([0.1], [0.1, 0.2])


def test_verdict_and_table_labels():
    assert verdict(-0.01, 0.01, 0.02, math.nan) == "win"
    assert verdict(0.01, 0.01, 0.02, math.nan) == "loss"
    # t significant but the sign-flip test is not: not settled by the rule (both must agree)
    assert verdict(-0.01, 0.001, 0.0625, 0.9) == "unsettled"
    assert verdict(0.0005, 0.5, 0.6, 0.01) == "equivalent"
    assert verdict(0.0005, math.nan, math.nan, 0.01) == "unsettled"
    rows = [
        {"mean": -0.02, "p_t": 0.001, "p_perm": 0.002, "p_tost": 0.9},
        {"mean": 0.0001, "p_t": 0.8, "p_perm": 0.9, "p_tost": 0.01},
        {"mean": 0.01, "p_t": 0.03, "p_perm": 0.03, "p_tost": 0.4},
    ]
    add_table_tests(rows)
    assert [r["p_t_holm"] for r in rows] == pytest.approx([0.003, 0.8, 0.06])
    assert [r["verdict"] for r in rows] == ["win", "equivalent", "unsettled"]


def test_nearly_equal_differences_give_no_warning():
    import warnings

    from flatminima.studies.stats import paired_test

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = paired_test([0.1389 + 1e-12, 0.1389], [0.1322, 0.1322 - 1e-12])
    assert 0 <= r["p_t"] <= 1
