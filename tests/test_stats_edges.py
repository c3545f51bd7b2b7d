"""fastmask.stats at its edges: the argument bounds (open intervals), the error messages,
the keys of every result, torch/numpy inputs, the infinite and degenerate cases. Written
against the surviving mutants of the mutation job (docs/reliability.md)."""
import math

import numpy as np
import pytest
import torch

from fastmask import stats


def test_bounds_are_open_intervals_with_named_errors():
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"^alpha must be in \(0, 1\), got {bad}$"):
            stats.compare([True, False], [False, True], alpha=bad)
        with pytest.raises(ValueError, match=rf"^confidence must be in \(0, 1\), got {bad}$"):
            stats.summary([1.0, 2.0], confidence=bad)
        with pytest.raises(ValueError, match=rf"^p must be in \(0, 1\), got {bad}$"):
            stats.t_ppf(bad, 3)
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match=rf"^df must be > 0, got {bad}$"):
            stats.t_cdf(1.0, bad)
    with pytest.raises(ValueError, match="^values must not be empty$"):
        stats.summary([])
    with pytest.raises(ValueError, match="^correct_a must not be empty$"):
        stats.mcnemar([], [])
    with pytest.raises(ValueError, match=r"^a and b must have the same length, got 2 and 1$"):
        stats.paired_t([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match=r"^paired_t needs at least 2 pairs, got 1$"):
        stats.paired_t([1.0], [2.0])
    with pytest.raises(TypeError, match="^values must be a 1-D sequence of numbers, got int$"):
        stats.summary(3)
    with pytest.raises(TypeError, match="^b must be a 1-D sequence of numbers, got NoneType$"):
        stats.paired_t([1.0, 2.0], None)
    with pytest.raises(TypeError, match="^a must be a 1-D sequence of numbers, got object$"):
        stats.paired_t(object(), [1.0, 2.0])
    with pytest.raises(ValueError, match=r"^b contains NaN"):
        stats.paired_t([1.0, 2.0], [1.0, math.nan])
    with pytest.raises(ValueError, match=r"^values contains NaN"):
        stats.summary([1.0, math.nan])


def test_result_keys():
    s = stats.summary([1.0, 2.0, 4.0])
    assert set(s) == {"mean", "std", "n", "confidence", "ci_low", "ci_high", "half_width"}
    assert s["confidence"] == 0.95
    p = stats.paired_t([1.0, 2.0, 4.0], [0.0, 1.5, 2.0])
    assert set(p) == {"n", "mean_diff", "t", "df", "p_value"} and p["n"] == 3 and p["df"] == 2
    c = stats.compare([True, False], [False, True], alpha=0.1)
    assert set(c) == {"test", "delta", "p_value", "alpha", "significant", "verdict", "detail"}
    assert c["alpha"] == 0.1 and c["detail"]["n"] == 2
    m = stats.mcnemar([True, False], [False, True])
    assert set(m) == {"n", "b", "c", "acc_a", "acc_b", "p_value"}


def test_tensor_and_array_inputs():
    a = torch.tensor([True, True, False, True])
    b = torch.tensor([False, True, True, False])
    r = stats.mcnemar(a, b)
    assert (r["b"], r["c"]) == (2, 1)
    assert stats.mcnemar(a, b.tolist()) == r and stats.mcnemar(a.tolist(), b) == r
    # torch bool tensors are per-sample correctness: McNemar, not the t-test
    assert stats.compare(a, b)["test"] == "mcnemar"
    assert stats.compare(np.array([0.8, 0.9, 0.7]), [True, False, True])["test"] == "paired_t"
    assert stats.compare([0.8, 0.9, 0.7], [True, False, True])["test"] == "paired_t"
    # a float tensor is accuracies: the paired t-test
    assert stats.compare(torch.tensor([0.8, 0.9, 0.7]), torch.tensor([0.7, 0.8, 0.75]))["test"] == "paired_t"
    assert stats.summary(torch.tensor([1.0, 3.0]))["mean"] == 2.0
    assert stats.paired_t(torch.tensor([1.0, 2.0, 4.0]), np.array([0.0, 1.5, 2.0]))["mean_diff"] == \
        pytest.approx(3.5 / 3)


def test_t_cdf_at_and_beyond_the_ends():
    assert stats.t_cdf(math.inf, 3) == 1.0 and stats.t_cdf(-math.inf, 3) == 0.0
    assert stats.t_cdf(0.5, 4) < 1.0 and stats.t_cdf(-0.5, 4) > 0.0  # finite t: not the inf branch
    assert stats.t_cdf(1e200, 3) == 1.0 and stats.t_cdf(-1e200, 3) == 0.0  # x = df / (df + t^2) = 0
    assert stats.t_cdf(0.0, 5) == 0.5
    sp = pytest.importorskip("scipy.stats")
    for t, df in ((0.5, 1.0), (3.0, 0.5), (-2.0, 30.0), (1e-3, 2.0)):
        assert stats.t_cdf(t, df) == pytest.approx(sp.t.cdf(t, df), rel=1e-10, abs=1e-14)


def test_t_ppf_edges():
    assert stats.t_ppf(0.5, 7) == 0.0
    sp = pytest.importorskip("scipy.stats")
    for p, df in ((0.5 + 1e-4, 3), (0.75, 1), (0.999, 2), (0.01, 10), (0.9999999, 1)):
        assert stats.t_ppf(p, df) == pytest.approx(sp.t.ppf(p, df), rel=1e-9)


def test_paired_t_degenerate_and_two_pairs():
    r = stats.paired_t([1.0, 2.0], [1.0, 2.0])  # every difference 0
    assert (r["t"], r["p_value"]) == (0.0, 1.0)
    r = stats.paired_t([3.0, 2.0], [1.0, 0.0])  # every difference +2
    assert r["t"] == math.inf and r["p_value"] == 0.0
    assert stats.paired_t([0.0, 0.0], [1.0, 1.0])["t"] == -math.inf
    r = stats.paired_t([1.0, 2.0], [0.5, 2.25])  # n = 2 is enough: df 1
    assert r["df"] == 1 and 0.0 < r["p_value"] <= 1.0
    # p is capped at 1 (a t of 0 from unequal pairs)
    r = stats.paired_t([1.0, 2.0, 3.0], [2.0, 1.0, 3.0])
    assert r["t"] == 0.0 and r["p_value"] == 1.0


def test_compare_significance_is_strict():
    a, b = [True] * 6 + [False] * 4, [False] * 6 + [True] * 4
    r = stats.compare(a, b)
    p = r["p_value"]
    assert not stats.compare(a, b, alpha=p)["significant"]  # p < alpha, not <=
    assert stats.compare(a, b, alpha=min(0.999, p * 1.01))["significant"]
    # a significant paired t with a mean difference of exactly 1.0 is still significant
    r = stats.compare([2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0], test="paired_t")
    assert r["delta"] == 1.0 and r["significant"] and r["verdict"] == "more robust"
    # a zero difference is never significant, and "less robust" needs delta < 0
    r = stats.compare([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], test="paired_t")
    assert r["verdict"] == "no significant difference"


def test_mcnemar_of_one_discordant_pair():
    r = stats.mcnemar([True, True], [False, True])  # b + c = 1: p = 2 * 1/2 = 1
    assert (r["b"], r["c"], r["p_value"]) == (1, 0, 1.0)


def test_betainc_at_the_ends():
    assert stats._betainc(2.0, 3.0, 0.0) == 0.0 and stats._betainc(2.0, 3.0, 1.0) == 1.0
    assert stats._betainc(2.0, 3.0, -1e-300) == 0.0
