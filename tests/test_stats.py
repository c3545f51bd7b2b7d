import math

import numpy as np
import pytest
import torch

from fastmask import stats


# Student t quantiles from any printed table (two-sided 95 %: p = 0.975).
@pytest.mark.parametrize("df,q", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423), (120, 1.9799)])
def test_t_ppf_matches_printed_table(df, q):
    assert stats.t_ppf(0.975, df) == pytest.approx(q, abs=1e-4)
    assert stats.t_ppf(0.025, df) == pytest.approx(-q, abs=1e-4)


def test_t_cdf_and_ppf_match_scipy():
    sp = pytest.importorskip("scipy.stats")
    for df in (1, 2.5, 3, 7, 29, 200):
        for t in (-30.0, -4.0, -1.0, -0.1, 0.0, 0.3, 2.0, 9.0):
            assert stats.t_cdf(t, df) == pytest.approx(sp.t.cdf(t, df), rel=1e-9, abs=1e-14)
        for p in (0.001, 0.05, 0.5, 0.9, 0.995):
            assert stats.t_ppf(p, df) == pytest.approx(sp.t.ppf(p, df), rel=1e-8, abs=1e-10)


def test_summary_known_data():
    s = stats.summary([1, 2, 3, 4, 5])
    assert s["mean"] == 3.0 and s["n"] == 5
    assert s["std"] == pytest.approx(math.sqrt(2.5))
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)
    assert s["ci_low"] == pytest.approx(3 - half, abs=1e-6)
    assert s["ci_high"] == pytest.approx(3 + half, abs=1e-6)
    # a wider interval at higher confidence
    assert stats.summary([1, 2, 3, 4, 5], confidence=0.99)["half_width"] > s["half_width"]


def test_summary_single_value_has_unknown_spread():
    s = stats.summary([0.9])
    assert s["mean"] == 0.9 and math.isnan(s["std"]) and math.isnan(s["half_width"])


def test_summary_rejects_bad_input():
    with pytest.raises(ValueError, match="values"):
        stats.summary([])
    with pytest.raises(ValueError, match="confidence"):
        stats.summary([1, 2], confidence=1.5)
    with pytest.raises(ValueError, match="NaN"):
        stats.summary([1.0, float("nan")])


def _pairs(n11, b, c, n00):
    a = [True] * n11 + [True] * b + [False] * c + [False] * n00
    bb = [True] * n11 + [False] * b + [True] * c + [False] * n00
    return a, bb


def test_mcnemar_exact_textbook_values():
    # 1 vs 9 discordant pairs: p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    r = stats.mcnemar(*_pairs(50, 1, 9, 40))
    assert (r["b"], r["c"], r["n"]) == (1, 9, 100)
    assert r["p_value"] == 22 / 1024
    # 0 vs 5: p = 2 / 32
    assert stats.mcnemar(*_pairs(3, 0, 5, 2))["p_value"] == 2 / 32
    # symmetric: equal discordant counts give p = 1, no discordance p = 1
    assert stats.mcnemar(*_pairs(10, 4, 4, 10))["p_value"] == 1.0
    assert stats.mcnemar(*_pairs(10, 0, 0, 10))["p_value"] == 1.0
    # order of the two arms does not change p
    a, b = _pairs(20, 3, 11, 5)
    assert stats.mcnemar(a, b)["p_value"] == stats.mcnemar(b, a)["p_value"]


def test_mcnemar_matches_scipy_binomtest_on_large_tables():
    sp = pytest.importorskip("scipy.stats")
    for b, c in ((121, 59), (1000, 1100), (7, 30)):
        r = stats.mcnemar(*_pairs(10, b, c, 10))
        assert r["p_value"] == pytest.approx(sp.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_mcnemar_accepts_numpy_and_rejects_mismatch():
    a, b = _pairs(5, 2, 6, 1)
    r = stats.mcnemar(np.array(a), np.array(b))
    assert (r["b"], r["c"]) == (2, 6)
    with pytest.raises(ValueError, match="same length"):
        stats.mcnemar([True, False], [True])


def test_paired_t_hand_computed_and_scipy():
    a = [0.90, 0.91, 0.93, 0.95, 0.97]
    b = [0.89, 0.89, 0.90, 0.91, 0.92]  # differences 1..5 (x 0.01)
    r = stats.paired_t(a, b)
    assert r["df"] == 4 and r["mean_diff"] == pytest.approx(0.03)
    assert r["t"] == pytest.approx(3 / (math.sqrt(2.5) / math.sqrt(5)))
    sp = pytest.importorskip("scipy.stats")
    ref = sp.ttest_rel(a, b)
    assert r["t"] == pytest.approx(ref.statistic) and r["p_value"] == pytest.approx(ref.pvalue, rel=1e-8)


def test_paired_t_constant_difference_and_errors():
    assert stats.paired_t([1, 2, 3], [1, 2, 3])["p_value"] == 1.0
    assert stats.paired_t([2, 3, 4], [1, 2, 3])["p_value"] == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        stats.paired_t([1.0], [0.5])


def test_compare_needs_significance_before_calling_anything_more_robust():
    # 2 more right out of 100: not significant
    a, b = _pairs(60, 3, 1, 36)
    r = stats.compare(a, b)
    assert r["test"] == "mcnemar" and r["delta"] == pytest.approx(0.02)
    assert r["p_value"] >= 0.05 and r["verdict"] == "no significant difference" and not r["significant"]
    # 30 vs 2 discordant: significant both ways
    a, b = _pairs(40, 30, 2, 28)
    assert stats.compare(a, b)["verdict"] == "more robust"
    assert stats.compare(b, a)["verdict"] == "less robust"
    # per-seed accuracies go to the paired t-test
    r = stats.compare([0.80, 0.82, 0.81], [0.70, 0.73, 0.71])
    assert r["test"] == "paired_t" and r["verdict"] == "more robust"
    r = stats.compare([0.80, 0.70, 0.81], [0.75, 0.74, 0.76])
    assert r["verdict"] == "no significant difference"
    with pytest.raises(ValueError, match="test"):
        stats.compare(a, b, test="wilcoxon")


def test_wilson_interval():
    from fastmask.stats import wilson
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1.959963984540054 ** 2 / (10 + 1.959963984540054 ** 2))
    lo, hi = wilson(90, 100)
    assert (lo, hi) == (pytest.approx(0.82563, abs=1e-5), pytest.approx(0.94477, abs=1e-5))
    assert wilson(5, 0) == (0.0, 1.0) and wilson(500, 500)[1] == 1.0 and wilson(0, 500)[0] == 0.0


def test_wilson_ends_are_exact_where_rounding_misses_them():
    from fastmask.stats import wilson
    z2 = 1.959963984540054 ** 2
    # one trial is an interval like any other (only n = 0 has no information)
    assert wilson(0, 1) == (0.0, pytest.approx(z2 / (1 + z2), rel=1e-12))
    assert wilson(1, 1) == (pytest.approx(1 / (1 + z2), rel=1e-12), 1.0)
    # the formula rounds to 1 - 1 ulp at k = n = 10 and to 5.6e-17 at k = 0, n = 3: the ends are exact
    assert wilson(10, 10)[1] == 1.0 and wilson(0, 3)[0] == 0.0


def test_versus_baseline_plain_lists_and_kept_keys():
    a = [True, True, False, True, True, True]
    b = [False, False, False, True, False, True]
    # plain sequences (no .dim) are one test, like a 1-D tensor
    vs = stats.versus_baseline({"base": b, "x": a}, "base", lambda r: r)
    assert vs == {"x": stats.compare(a, b)}
    # keys are kept per eps of an eps x n tensor as well
    ta, tb = torch.tensor([a, b]), torch.tensor([b, b])
    vs = stats.versus_baseline({"base": tb, "x": ta}, "base", lambda r: r, keys=("delta", "test"))
    assert vs == {"x": [{k: stats.compare(ta[i], tb[i])[k] for k in ("delta", "test")} for i in range(2)]}
