"""Does flatness rank the estimators by their generalisation error? Kendall tau per alpha.

For each ``alpha`` the fits of a study (one per ``(estimator, stop)``) are averaged over seeds;
``tau`` is Kendall's tau-b between a flatness measure, oriented so that larger = flatter, and
``eps_g``. ``tau = -1``: the flattest estimator generalises best and the ordering is perfect;
``tau = +1``: exactly inverted. The 95 % interval is a percentile bootstrap over seeds (the
cells are resampled with replacement, whole: every estimator of a resampled seed comes along, so
the pairing on the same data is kept).

Measures: ``sigma_star`` (noise at which the expected training error reaches the cell's common
target, i.e. flatness at matched training error) and ``-local_energy`` (raw local energy at a
fixed ``sigma``).

Fits flagged ``collapsed`` (at chance, or without finite weights) are left out of the means;
an estimator with no finite value at an alpha is left out of that alpha's tau.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from flatminima.gmm.experiment import as_float

__all__ = ["FLATNESS_MEASURES", "kendall_by_alpha"]

# sign: larger = flatter; free_entropy (Phi <= 0 up to errors removed by noise) is measured only
# with ``--free-entropy``
FLATNESS_MEASURES = {"sigma_star": 1.0, "local_energy": -1.0, "free_entropy": 1.0}


def _col_mean(a: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of the finite entries; nan for a column without any (no warning)."""
    ok = np.isfinite(a)
    count = ok.sum(0)
    total = np.where(ok, a, 0.0).sum(0)
    return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)


def _tau(flat: np.ndarray, eps: np.ndarray) -> float:
    ok = np.isfinite(flat) & np.isfinite(eps)
    if ok.sum() < 3:
        return float("nan")
    return float(stats.kendalltau(flat[ok], eps[ok]).statistic)


def kendall_by_alpha(
    rows: Sequence[dict[str, object]],
    measure: str = "sigma_star",
    n_boot: int = 2000,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Kendall tau between flatness and ``eps_g`` across estimators, per ``alpha``.

    Args:
        rows: Study rows (:func:`flatminima.gmm.experiment.run_study`).
        measure: A key of :data:`FLATNESS_MEASURES`.
        n_boot: Bootstrap resamples of the seeds.
        seed: Seed of the bootstrap.

    Returns:
        One dict per alpha: ``alpha``, ``tau``, ``lo``, ``hi`` (95 % bootstrap interval),
        ``n_fits``, ``n_seeds``.

    Raises:
        ValueError: on an unknown ``measure`` or ``n_boot < 1``.
    """
    if measure not in FLATNESS_MEASURES:
        raise ValueError(f"Invalid measure: {measure!r} (valid: {', '.join(FLATNESS_MEASURES)})")
    if not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"Invalid n_boot value: {n_boot!r} (expected an int >= 1)")
    sign = FLATNESS_MEASURES[measure]
    rng = np.random.default_rng(seed)
    out = []
    for alpha in sorted({float(r["alpha"]) for r in rows}):  # type: ignore[arg-type]
        rs = [r for r in rows if as_float(r["alpha"]) == alpha]
        fits = sorted({(str(r["estimator"]), str(r["stop"])) for r in rs})
        seeds = sorted({int(as_float(r["seed"])) for r in rs})
        flat = np.full((len(seeds), len(fits)), np.nan)
        eps = np.full_like(flat, np.nan)
        for r in rs:
            i = seeds.index(int(as_float(r["seed"])))
            j = fits.index((str(r["estimator"]), str(r["stop"])))
            if as_float(r.get("collapsed")) == 1.0:
                continue  # a collapsed fit is left out (nan)
            flat[i, j] = sign * as_float(r.get(measure))  # nan: not measured in this row
            eps[i, j] = as_float(r.get("eps_g"))
        tau = _tau(_col_mean(flat), _col_mean(eps))
        boot = []
        for _ in range(n_boot if len(seeds) > 1 else 0):  # one seed: no interval
            idx = rng.integers(0, len(seeds), len(seeds))
            boot.append(_tau(_col_mean(flat[idx]), _col_mean(eps[idx])))
        b = np.asarray(boot)
        b = b[np.isfinite(b)]
        lo, hi = np.quantile(b, [0.025, 0.975]) if b.size else (math.nan, math.nan)
        out.append(
            dict(
                alpha=alpha,
                tau=tau,
                lo=float(lo),
                hi=float(hi),
                n_fits=len(fits),
                n_seeds=len(seeds),
            )
        )
    return out
