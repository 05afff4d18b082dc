"""Paired statistics for few seeds: t and exact sign-flip tests, Holm, TOST equivalence, labels.

For one paired comparison of arm ``a`` against reference ``r`` over seeds ``s = 1..n`` the
differences are ``d_s = x_a(s) - x_r(s)`` (for errors: negative = ``a`` better). Reported:

* ``mean = mean(d)``, ``std = std(d, ddof=1)``, ``se = std / sqrt(n)`` and the Student-t 95%
  interval ``mean +- t_{0.975, n-1} se``;
* ``p_t``: the two-sided paired t-test (:func:`scipy.stats.ttest_rel`);
* ``p_perm``: the exact two-sided sign-flip permutation test. Under H0 (the pair labels are
  exchangeable) every sign pattern ``e in {-1, +1}^n`` is equally likely;
  ``p = #{e : |sum(e d)| >= |sum(d)|} / 2^n`` over all ``2^n`` patterns for ``n <= 20`` (a
  seeded Monte Carlo estimate with ``(k + 1) / (B + 1)`` beyond). With ``n = 5`` differences of
  one sign the smallest possible value is ``2 / 32 = 0.0625``;
* Holm's step-down adjustment over the comparisons of one table: with ``m`` p-values sorted
  ``p_(1) <= ... <= p_(m)``, ``p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``;
* ``p_tost``: two one-sided paired t-tests (Schuirmann) of ``H0: |mean| >= margin``,
  ``p_tost = max(P(T >= (mean + margin)/se), P(T <= (mean - margin)/se))`` with ``T ~ t_{n-1}``;
  equivalence within ``margin`` is shown when ``p_tost < alpha``.

Decision rule (:func:`verdict`): a comparison is significant when the **larger** of its Holm-
adjusted t and sign-flip p-values is below ``alpha`` (both tests must agree: the t-test leans on
normality, the sign-flip test cannot go below ``2 / 2^n``). Significant: ``win`` (mean < 0,
lower is better) or ``loss``; not significant: ``equivalent`` when ``p_tost < alpha`` (TOST at
the raw level: it is an intersection-union test), else ``unsettled``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "COLLAPSE_FRACTION",
    "DEFAULT_MARGIN",
    "MAX_EXACT",
    "holm",
    "is_collapsed",
    "paired_test",
    "sign_flip_p",
    "tost_p",
    "verdict",
]

#: equivalence margin in error units (0.3 percentage points) when a preset names none
DEFAULT_MARGIN = 0.003
#: up to this many pairs the sign-flip test enumerates all 2^n patterns
MAX_EXACT = 20


#: a run "collapsed" (ended at chance) when its final training error and loss are both at least
#: this fraction of the chance values 1 - 1/C and log C
COLLAPSE_FRACTION = 0.9


def is_collapsed(train_error: float | None, train_loss: float | None, num_classes: int) -> bool:
    """Whether a finished network is at chance level on its training data.

    Rule: ``train_error >= 0.9 (1 - 1/C)`` **and** ``train_loss >= 0.9 log C`` (``C`` classes;
    the uniform prediction has error ``1 - 1/C`` on balanced data and loss exactly ``log C``).
    A trained network has a far lower loss; a collapsed one (constant or uniform output) sits at
    or above both. Missing values (``None``/NaN) are not evidence of collapse.

    Raises:
        ValueError: ``num_classes`` < 2.

    Example:
        >>> is_collapsed(0.90, 2.3026, 10), is_collapsed(0.12, 0.4, 10)
        (True, False)
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"Invalid num_classes {num_classes!r}: an integer >= 2")
    if train_error is None or train_loss is None:
        return False
    if not (math.isfinite(train_error) and math.isfinite(train_loss)):
        return False
    chance_err, chance_loss = 1 - 1 / num_classes, math.log(num_classes)
    return (
        train_error >= COLLAPSE_FRACTION * chance_err
        and train_loss >= COLLAPSE_FRACTION * chance_loss
    )


def _diffs(d: Sequence[float]) -> np.ndarray:
    arr = np.asarray(list(d), dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"Invalid differences: expected a 1-D sequence, got shape {arr.shape}")
    return arr


def sign_flip_p(d: Sequence[float], *, n_resamples: int = 100_000, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value of the paired differences ``d``.

    ``p = #{e in {-1,1}^n : |sum e_i d_i| >= |sum d_i|} / 2^n`` (exact for ``n <= 20``; above,
    ``(k + 1) / (B + 1)`` over ``B = n_resamples`` random patterns). A relative tolerance of
    1e-12 counts patterns whose statistic equals the observed one up to round-off.

    Args:
        d: paired differences (no NaN).
        n_resamples: random patterns for ``n > 20``.
        seed: seed of those patterns.

    Returns:
        The p-value (NaN for no differences).

    Raises:
        ValueError: ``d`` holds NaN or is not one-dimensional.

    Example:
        >>> sign_flip_p([0.1, 0.2, 0.3, 0.4, 0.5])  # all 5 positive: 2 of 32 patterns
        0.0625
    """
    x = _diffs(d)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"Invalid differences {x.tolist()}: NaN or inf (drop those pairs)")
    n = len(x)
    if n == 0:
        return math.nan
    obs = abs(x.sum())
    tol = 1e-12 * max(1.0, float(np.abs(x).sum()))
    if n <= MAX_EXACT:
        count, chunk = 0, 1 << 14
        bits = np.arange(n)
        for start in range(0, 1 << n, chunk):
            codes = np.arange(start, min(start + chunk, 1 << n))
            signs = 1.0 - 2.0 * ((codes[:, None] >> bits) & 1)
            count += int(np.count_nonzero(np.abs(signs @ x) >= obs - tol))
        return count / float(1 << n)
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(n_resamples, n))
    k = int(np.count_nonzero(np.abs(signs @ x) >= obs - tol))
    return (k + 1) / (n_resamples + 1)


def holm(p: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (NaN entries stay NaN and do not count in ``m``).

    Example:
        >>> holm([0.01, 0.04, 0.03, 0.005])
        [0.03, 0.06, 0.06, 0.02]
    """
    arr = np.asarray(list(p), dtype=float)
    out = np.full(arr.shape, math.nan)
    ok = np.flatnonzero(np.isfinite(arr))
    m = len(ok)
    order = ok[np.argsort(arr[ok], kind="stable")]
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * arr[j]))
        out[j] = running
    return [float(round(v, 15)) if math.isfinite(v) else math.nan for v in out]


def tost_p(d: Sequence[float], margin: float) -> float:
    """Two one-sided paired t-tests of ``H0: |mean(d)| >= margin`` (Schuirmann's TOST).

    ``p = max(sf((mean + margin)/se), cdf((mean - margin)/se))`` under ``t_{n-1}``; NaN for
    ``n < 2``. Zero spread: 0 when ``|mean| < margin``, else 1.

    Raises:
        ValueError: ``margin`` not a finite number > 0.

    Example:
        >>> round(tost_p([0.001, -0.001, 0.002, 0.0], 0.003), 4)
        0.0152
    """
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin > 0):
        raise ValueError(f"Invalid equivalence margin {margin!r}: must be a finite number > 0")
    from scipy import stats

    x = _diffs(d)
    x = x[np.isfinite(x)]
    n = len(x)
    if n < 2:
        return math.nan
    mean, se = float(x.mean()), float(x.std(ddof=1)) / math.sqrt(n)
    if se == 0:
        return 0.0 if abs(mean) < margin else 1.0
    lower = float(stats.t.sf((mean + margin) / se, n - 1))
    upper = float(stats.t.cdf((mean - margin) / se, n - 1))
    return max(lower, upper)


def paired_test(
    a: Sequence[float], b: Sequence[float], *, margin: float | None = None
) -> dict[str, Any]:
    """Every statistic of one paired comparison ``d = a - b`` (see the module docstring).

    Pairs where either value is NaN are dropped (``n`` counts the rest).

    Returns:
        ``{"n", "mean", "std", "se", "ci_low", "ci_high", "p_t", "p_perm", "p_tost"}``
        (``p_tost`` NaN without a margin; every p NaN for fewer than 2 pairs).

    Raises:
        ValueError: ``a`` and ``b`` have different lengths, or a bad margin.

    Example:
        >>> r = paired_test([0.10, 0.12, 0.11], [0.12, 0.15, 0.12])
        >>> round(r["mean"], 4), r["p_perm"]
        (-0.02, 0.25)
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    from scipy import stats

    x = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    nan = math.nan
    out: dict[str, Any] = {"n": n, "mean": float(x.mean()) if n else nan, "std": nan, "se": nan}
    out.update(ci_low=nan, ci_high=nan, p_t=nan, p_perm=nan, p_tost=nan)
    if n < 2:
        return out
    std = float(x.std(ddof=1))
    se = std / math.sqrt(n)
    half = float(stats.t.ppf(0.975, n - 1)) * se
    out.update(std=std, se=se, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    if se > 0:
        with warnings.catch_warnings():
            # scipy warns of "catastrophic cancellation" when the differences are nearly equal;
            # the p-value is still right (t is large), and the warning would reach the CLI user.
            warnings.simplefilter("ignore", RuntimeWarning)
            out["p_t"] = float(stats.ttest_1samp(x, 0.0).pvalue)
    else:
        out["p_t"] = 1.0 if out["mean"] == 0 else 0.0
    out["p_perm"] = sign_flip_p(x)
    if margin is not None:
        out["p_tost"] = tost_p(x, margin)
    return out


def verdict(
    mean: float, p_t_holm: float, p_perm_holm: float, p_tost: float, alpha: float = 0.05
) -> str:
    """``win`` / ``loss`` / ``equivalent`` / ``unsettled`` (lower is better; module docstring).

    Example:
        >>> verdict(-0.01, 0.01, 0.03, 0.5), verdict(0.001, 0.4, 0.6, 0.01)
        ('win', 'equivalent')
    """
    if not (math.isfinite(p_t_holm) and math.isfinite(p_perm_holm)):
        return "unsettled"
    if max(p_t_holm, p_perm_holm) < alpha:
        return "win" if mean < 0 else "loss"
    if math.isfinite(p_tost) and p_tost < alpha:
        return "equivalent"
    return "unsettled"


def add_table_tests(
    rows: list[dict[str, Any]], alpha: float = 0.05, prefix: str = ""
) -> list[dict[str, Any]]:
    """Holm-adjust the ``p_t`` and ``p_perm`` of ``rows`` (one table) and add the verdict.

    Keys read and written carry ``prefix`` (e.g. ``"dE_"`` for flatness rows): adds
    ``p_t_holm``, ``p_perm_holm`` and ``verdict``. Rows are changed in place and returned.
    """
    for key in ("p_t", "p_perm"):
        adj = holm([r.get(prefix + key, math.nan) for r in rows])
        for r, v in zip(rows, adj):
            r[prefix + key + "_holm"] = v
    for r in rows:
        r[prefix + "verdict"] = verdict(
            r.get(prefix + "mean", math.nan),
            r[prefix + "p_t_holm"],
            r[prefix + "p_perm_holm"],
            r.get(prefix + "p_tost", math.nan),
            alpha,
        )
    return rows
