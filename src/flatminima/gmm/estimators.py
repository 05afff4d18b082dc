"""Closed-form and convex-ERM estimators of a linear classifier on the Gaussian mixture.

Every estimator returns a :class:`LinearClassifier` ``(w, b)`` predicting
``sign(w . x / sqrt(N) + b)``. The ERM objective follows Mignacco et al. (ICML 2020,
arXiv:2002.11544), with ``a_mu = x_mu / sqrt(N)``::

    L(w, b) = sum_mu loss(y_mu (w . a_mu + b)) + (lam / 2) ||w||^2

    square:    loss(h) = (1 - h)^2 / 2          (closed form)
    logistic:  loss(h) = log(1 + exp(-h))       (L-BFGS on the primal)
    hinge:     loss(h) = max(0, 1 - h)          (bound-constrained L-BFGS on the dual;
                                                  lam = 0 is the hard-margin SVM)

The bias ``b`` is unpenalised for square and logistic; for hinge it is the weight of a constant
feature of value 1 and so penalised like ``w`` (as in liblinear), which keeps the dual
box-constrained. The Hebbian estimator ``w = sum_mu y_mu x_mu sqrt(N) / P`` is the posterior-mean
direction, exactly Bayes-optimal in the balanced mixture at every N (see
:func:`flatminima.gmm.theory.bayes_optimal_error`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import linalg, optimize
from scipy.special import expit, log_expit

from flatminima.gmm.data import check_model_args

__all__ = [
    "LinearClassifier",
    "ERM_LOSSES",
    "hebbian",
    "bayes_optimal",
    "erm",
    "erm_square",
    "erm_logistic",
    "erm_hinge",
    "is_separable",
]

log = logging.getLogger(__name__)

ERM_LOSSES = ("square", "logistic", "hinge")


@dataclass(frozen=True)
class LinearClassifier:
    """A linear classifier ``sign(w . x / sqrt(N) + b)`` and solver diagnostics."""

    w: np.ndarray
    b: float = 0.0
    converged: bool = True
    info: str = ""

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Labels in {-1, +1} (0 pre-activation counts as -1)."""
        return np.where(self.preactivation(X) > 0, 1.0, -1.0)

    def preactivation(self, X: np.ndarray) -> np.ndarray:
        """``X @ w / sqrt(N) + b``."""
        return X @ self.w / math.sqrt(self.w.size) + self.b


def _check_xy(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise ValueError(f"Invalid shapes: X {X.shape}, y {y.shape} (expected [P, N] and [P])")
    if not np.all(np.abs(y) == 1.0):
        raise ValueError(f"Invalid labels: {np.unique(y)[:5]} (expected values in {{-1, +1}})")
    return X, y


def _check_lam(lam: float, allow_zero: bool = True) -> float:
    ok = (
        isinstance(lam, int | float)
        and math.isfinite(lam)
        and (lam >= 0 if allow_zero else lam > 0)
    )
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Invalid lam value: {lam!r} (the ridge strength must be {bound})")
    return float(lam)


def hebbian(X: np.ndarray, y: np.ndarray) -> LinearClassifier:
    """Hebbian estimator ``w = sqrt(N) / P * sum_mu y_mu x_mu`` (so ``m -> 1``), ``b = 0``.

    Raises:
        ValueError: on bad shapes or labels.
    """
    X, y = _check_xy(X, y)
    p, n = X.shape
    return LinearClassifier(X.T @ y * (math.sqrt(n) / p), 0.0)


def bayes_optimal(X: np.ndarray, y: np.ndarray, delta: float, rho: float = 0.5) -> LinearClassifier:
    """Exact finite-N Bayes-optimal classifier for the prior ``v ~ N(0, I)``.

    ``w_B = sum_mu y_mu x_mu / (sqrt(N) (Delta + alpha))`` (posterior mean of ``v``) and
    ``b = (Delta + s2 / N) / 2 * log(rho / (1 - rho))``, ``s2 = Delta / (Delta + alpha)``: the
    sign of the posterior log-likelihood ratio of the two labels for a fresh point.

    Raises:
        ValueError: on bad shapes, labels, ``delta`` or ``rho``.
    """
    X, y = _check_xy(X, y)
    check_model_args(delta, rho)
    p, n = X.shape
    alpha = p / n
    w = X.T @ y / (math.sqrt(n) * (delta + alpha))
    s2 = delta / (delta + alpha)
    b = 0.5 * (delta + s2 / n) * math.log(rho / (1.0 - rho))
    return LinearClassifier(w, b)


def erm_square(
    X: np.ndarray, y: np.ndarray, lam: float, fit_intercept: bool = False
) -> LinearClassifier:
    """Ridge regression on the labels: ``min_w sum_mu (y_mu - w . a_mu - b)^2 / 2 + lam/2 ||w||^2``.

    Solves ``(A^T A + lam I) w = A^T y`` (with an unpenalised bias column when
    ``fit_intercept``). ``lam = 0`` gives the minimum-norm least-squares solution (the
    interpolator when P < N).

    Raises:
        ValueError: on bad shapes, labels or ``lam < 0``.
    """
    X, y = _check_xy(X, y)
    lam = _check_lam(lam)
    p, n = X.shape
    A = X / math.sqrt(n)
    if fit_intercept:
        A = np.hstack([A, np.ones((p, 1))])
    if lam == 0.0:
        sol = linalg.lstsq(A, y, lapack_driver="gelsd")[0]
    else:
        G = A.T @ A
        idx = np.arange(n)
        G[idx, idx] += lam
        sol = linalg.solve(G, A.T @ y, assume_a="pos")
    return LinearClassifier(sol[:n].copy(), float(sol[n]) if fit_intercept else 0.0)


def erm_logistic(
    X: np.ndarray,
    y: np.ndarray,
    lam: float,
    fit_intercept: bool = False,
    tol: float = 1e-9,
    max_iter: int = 20000,
) -> LinearClassifier:
    """Ridge-regularised logistic regression by L-BFGS on the primal.

    Minimises ``sum_mu log(1 + exp(-y_mu (w . a_mu + b))) + lam/2 ||w||^2``. The minimiser
    exists only for ``lam > 0`` (or non-separable data); as ``lam -> 0`` on separable data its
    direction tends to the max-margin one, see :func:`erm_hinge` with ``lam = 0``.

    Args:
        tol: Stop when the largest gradient component is below ``tol * max(1, P)``.

    Raises:
        ValueError: on bad shapes, labels or ``lam <= 0``.
    """
    X, y = _check_xy(X, y)
    lam = _check_lam(lam, allow_zero=False)
    p, n = X.shape
    Ay = X * (y / math.sqrt(n))[:, None]

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:n], (theta[n] if fit_intercept else 0.0)
        h = Ay @ w + y * b
        f = -np.sum(log_expit(h)) + 0.5 * lam * (w @ w)
        s = -expit(-h)  # d loss / d h
        g = Ay.T @ s + lam * w
        if fit_intercept:
            g = np.append(g, s @ y)
        return float(f), g

    theta0 = np.zeros(n + int(fit_intercept))
    res = optimize.minimize(
        fun,
        theta0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "gtol": tol * max(1.0, p), "ftol": 0.0, "maxcor": 30},
    )
    gmax = float(np.max(np.abs(res.jac)))
    ok = gmax <= 1e3 * tol * max(1.0, p)
    if not ok:
        log.warning("logistic ERM (lam=%g) stopped with max|grad|=%.3g: %s", lam, gmax, res.message)
    w = res.x[:n].copy()
    return LinearClassifier(
        w, float(res.x[n]) if fit_intercept else 0.0, ok, f"max|grad|={gmax:.2e}"
    )


def is_separable(X: np.ndarray, y: np.ndarray, fit_intercept: bool = False) -> bool:
    """Whether some ``w`` (and ``b``) has ``y_mu (w . a_mu + b) >= 1`` for every sample.

    Decided by the hard-margin dual of :func:`erm_hinge`: it is bounded (max margin
    ``kappa = 1 / ||w||`` with ``sum beta = 1 / kappa^2``) exactly when the data are separable.
    Margins below ``1e-4`` (in units where ``||a_mu||^2 ~ Delta``) count as not separable.
    """
    try:
        erm_hinge(X, y, 0.0, fit_intercept)
    except ValueError:
        return False
    return True


class _Unbounded(Exception):
    pass


_MAX_DUAL_MASS = 1e8  # sum(beta) = 1 / margin^2: margins below 1e-4 are treated as none


def erm_hinge(
    X: np.ndarray,
    y: np.ndarray,
    lam: float,
    fit_intercept: bool = False,
    tol: float = 1e-10,
    max_iter: int = 3000,
) -> LinearClassifier:
    """Hinge-loss ERM (linear SVM) by L-BFGS-B on its box-constrained dual.

    With ``beta_mu = alpha_mu / lam`` the dual of
    ``sum_mu max(0, 1 - y_mu w . a_mu) + lam/2 ||w||^2`` is ``lam`` times
    ``max_beta sum_mu beta_mu - 1/2 ||sum_mu beta_mu y_mu a_mu||^2`` on ``0 <= beta_mu <= 1/lam``,
    and ``w = sum_mu beta_mu y_mu a_mu``. ``lam = 0`` removes the upper bound: the hard-margin
    SVM, i.e. the max-margin direction, which exists only for separable data (the dual is then
    bounded; it is declared unbounded once ``sum beta > 1e8``, i.e. margin < 1e-4). The
    gradient needs two mat-vecs, never the P x P Gram matrix.

    Raises:
        ValueError: on bad shapes, labels, ``lam < 0``, or ``lam = 0`` on non-separable data.
    """
    X, y = _check_xy(X, y)
    lam = _check_lam(lam)
    p, n = X.shape
    A = X / math.sqrt(n)
    if fit_intercept:
        A = np.hstack([A, np.ones((p, 1))])
    Ay = A * y[:, None]

    def fun(beta: np.ndarray) -> tuple[float, np.ndarray]:
        if lam == 0.0 and beta.sum() > _MAX_DUAL_MASS:
            raise _Unbounded
        w = Ay.T @ beta
        return float(0.5 * (w @ w) - beta.sum()), Ay @ w - 1.0

    upper = None if lam == 0.0 else 1.0 / lam
    try:
        res = optimize.minimize(
            fun,
            np.zeros(p),
            jac=True,
            method="L-BFGS-B",
            bounds=[(0.0, upper)] * p,
            options={"maxiter": max_iter, "gtol": tol, "ftol": 0.0, "maxcor": 50},
        )
    except _Unbounded:
        raise ValueError(
            "Invalid lam value: 0 (hard-margin hinge needs separable data; these "
            f"P={p}, N={n} samples are not separable: use lam > 0)"
        ) from None
    beta = res.x
    w_full = Ay.T @ beta
    # KKT residual: margins y h >= 1 where beta = 0, = 1 on 0 < beta < upper, <= 1 at the bound.
    margins = Ay @ w_full
    viol = np.where(beta <= 1e-12, np.maximum(0.0, 1.0 - margins), np.abs(margins - 1.0))
    if upper is not None:
        at_upper = beta >= upper * (1 - 1e-9)
        viol = np.where(at_upper, np.maximum(0.0, margins - 1.0), viol)
    kkt = float(np.max(viol))
    ok = kkt < 1e-3
    if not ok:
        log.warning("hinge ERM (lam=%g) KKT residual %.3g after %d its", lam, kkt, res.nit)
    w = w_full[:n].copy()
    b = float(w_full[n]) if fit_intercept else 0.0
    return LinearClassifier(w, b, ok, f"kkt={kkt:.2e} nit={res.nit}")


def erm(
    X: np.ndarray, y: np.ndarray, loss: str, lam: float, fit_intercept: bool = False
) -> LinearClassifier:
    """Dispatch to :func:`erm_square`, :func:`erm_logistic` or :func:`erm_hinge`.

    Raises:
        ValueError: on an unknown ``loss`` (valid: ``ERM_LOSSES``) or bad arguments.
    """
    if loss == "square":
        return erm_square(X, y, lam, fit_intercept)
    if loss == "logistic":
        return erm_logistic(X, y, lam, fit_intercept)
    if loss == "hinge":
        return erm_hinge(X, y, lam, fit_intercept)
    raise ValueError(f"Invalid loss: {loss!r} (valid: {', '.join(ERM_LOSSES)})")
