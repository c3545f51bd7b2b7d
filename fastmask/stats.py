"""Small, dependency-free statistics for comparing models.

- summary(values): mean, sample std and a t-distribution confidence interval.
- mcnemar(correct_a, correct_b): McNemar's exact test on paired per-sample
  correctness (two-sided binomial test on the discordant pairs).
- paired_t(a, b): paired t-test across seeds.
- wilson(k, n): the Wilson score interval of a binomial proportion k / n.
- compare(row, baseline): difference plus a test; a row is only ever called
  "more robust" (or "less robust") when p < alpha.
- versus_baseline(rows, baseline, correct): compare() of every row against the
  baseline row, over the same samples (the one compare-to-baseline loop of
  reproduce, the seeds statistics and the honest evaluation).

The Student t distribution is computed here (regularized incomplete beta by a
continued fraction, quantiles by bisection) so that importing this module needs
neither numpy nor scipy; tests check it against scipy.
"""
import math

__all__ = ["summary", "t_cdf", "t_ppf", "mcnemar", "paired_t", "compare", "versus_baseline", "wilson"]


def _values(v, name):
    try:
        out = [float(a) for a in (v.tolist() if hasattr(v, "tolist") else v)]
    except TypeError:
        raise TypeError(f"{name} must be a 1-D sequence of numbers, got {type(v).__name__}") from None
    if any(math.isnan(a) for a in out):
        raise ValueError(f"{name} contains NaN: {out}")
    return out


def _betacf(a, b, x):
    # continued fraction of the regularized incomplete beta (modified Lentz)
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b) for a, b > 0, x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t, df):
    """P(T <= t) for Student's t with df > 0 degrees of freedom."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(p, df):
    """Quantile of Student's t: the t with t_cdf(t, df) == p (bisection)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def summary(values, confidence=0.95):
    """Mean, sample std (ddof=1), n and the t-distribution CI of the mean.

    With a single value the std and the CI half-width are NaN (unknown), not 0.
    """
    v = _values(values, "values")
    if not v:
        raise ValueError("values must not be empty")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = len(v)
    mean = math.fsum(v) / n
    if n == 1:
        std = half = float("nan")
    else:
        std = math.sqrt(math.fsum((a - mean) ** 2 for a in v) / (n - 1))
        half = t_ppf(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "confidence": confidence,
            "ci_low": mean - half, "ci_high": mean + half, "half_width": half}


def wilson(k, n, z=1.959963984540054):
    """(low, high): the Wilson score interval of the proportion k / n (default 95 %)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at k = 0 (k = n) the bound is 0 (1) exactly; rounding would leave it a hair inside
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def _binom_two_sided(k, n):
    # exact two-sided p-value of k successes out of n under p = 1/2
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2 ** n)  # Python int / int: correctly rounded, no overflow


def mcnemar(correct_a, correct_b):
    """McNemar's exact test on paired per-sample correctness (same samples, same order).

    Returns n (pairs), b (a right, b wrong), c (a wrong, b right), acc_a, acc_b
    and the exact two-sided p-value of the binomial test of b against b + c at 1/2.
    """
    a = [bool(v) for v in (correct_a.tolist() if hasattr(correct_a, "tolist") else correct_a)]
    b_ = [bool(v) for v in (correct_b.tolist() if hasattr(correct_b, "tolist") else correct_b)]
    if len(a) != len(b_):
        raise ValueError(f"correct_a and correct_b must have the same length, got {len(a)} and {len(b_)}")
    if not a:
        raise ValueError("correct_a must not be empty")
    b = sum(1 for u, v in zip(a, b_) if u and not v)
    c = sum(1 for u, v in zip(a, b_) if v and not u)
    return {"n": len(a), "b": b, "c": c, "acc_a": sum(a) / len(a), "acc_b": sum(b_) / len(b_),
            "p_value": _binom_two_sided(b, b + c)}


def paired_t(a, b):
    """Paired two-sided t-test of mean(a - b) == 0 (e.g. one value per seed)."""
    a, b = _values(a, "a"), _values(b, "b")
    if len(a) != len(b):
        raise ValueError(f"a and b must have the same length, got {len(a)} and {len(b)}")
    n = len(a)
    if n < 2:
        raise ValueError(f"paired_t needs at least 2 pairs, got {n}")
    d = [u - v for u, v in zip(a, b)]
    mean = math.fsum(d) / n
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    if sd == 0.0:  # every pair differs by the same amount
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        p = 1.0 if mean == 0.0 else 0.0
    else:
        t = mean / (sd / math.sqrt(n))
        p = min(1.0, 2.0 * t_cdf(-abs(t), n - 1))
    return {"n": n, "mean_diff": mean, "t": t, "df": n - 1, "p_value": p}


def _is_bool_seq(v):
    dtype = getattr(v, "dtype", None)
    if dtype is not None:
        return "bool" in str(dtype)
    v = list(v)
    return bool(v) and all(isinstance(e, bool) for e in v)


def compare(row, baseline, *, alpha=0.05, test="auto"):
    """Compare a row against a baseline with a significance test.

    row, baseline: per-sample correctness (booleans, same samples: McNemar) or
    one accuracy per seed (numbers, paired by seed: paired t-test). test:
    "auto" (McNemar for booleans, else paired t), "mcnemar" or "paired_t".
    Returns delta (row minus baseline accuracy), p_value, test, significant and
    verdict: "more robust" / "less robust" only when p < alpha, otherwise
    "no significant difference".
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if test == "auto":
        test = "mcnemar" if _is_bool_seq(row) and _is_bool_seq(baseline) else "paired_t"
    if test == "mcnemar":
        r = mcnemar(row, baseline)
        delta = r["acc_a"] - r["acc_b"]
    elif test == "paired_t":
        r = paired_t(row, baseline)
        delta = r["mean_diff"]
    else:
        raise ValueError(f"test must be 'auto', 'mcnemar' or 'paired_t', got {test!r}")
    significant = r["p_value"] < alpha and delta != 0.0
    verdict = ("more robust" if delta > 0 else "less robust") if significant else "no significant difference"
    return {"test": test, "delta": delta, "p_value": r["p_value"], "alpha": alpha,
            "significant": significant, "verdict": verdict, "detail": r}


def _versus(c, b, keys):
    if isinstance(c, dict):
        return {k: _versus(c[k], b[k], keys) for k in c}
    if getattr(c, "dim", lambda: 1)() == 2:  # eps x n: one test per eps
        return [_versus(ci, bi, keys) for ci, bi in zip(c, b)]
    r = compare(c, b)
    return r if keys is None else {k: r[k] for k in keys}


def versus_baseline(rows, baseline, correct, *, keys=None):
    """{row: comparison} for every row of {name: row} but `baseline`: compare() of correct(row)
    against correct(rows[baseline]). correct(row) is per-sample correctness (a 1-D bool tensor: one
    test), an eps x n bool tensor (one test per eps: a list) or a dict of those (a dict of results).
    keys: keep only these fields of each result."""
    base = correct(rows[baseline])
    return {name: _versus(correct(r), base, keys) for name, r in rows.items() if name != baseline}
