"""Replica-theory learning curves of ridge ERM on the Gaussian mixture (N -> infinity).

Mignacco, Krzakala, Lu, Zdeborova, "The role of regularization in classification of
high-dimensional noisy Gaussian mixture", ICML 2020 (arXiv:2002.11544), Sec. 3; the same
equations follow from the cavity method / convex Gaussian min-max theorem. For the estimator

    (w, b) = argmin  sum_mu l(y_mu, h_mu) + lam/2 ||w||^2,   h_mu = w . x_mu / sqrt(N) + b,

on ``P = alpha N`` samples ``x = y v / sqrt(N) + sqrt(Delta) z``
(docs/design.md, "Gaussian mixture"),
the overlaps ``m = w . v / N``, ``q = ||w||^2 / N`` and the bias ``b`` concentrate on the fixed
point of (margin form: ``u = y omega``, ``t = y eta``)

    u ~ m + y b + sqrt(Delta q) xi,   xi ~ N(0, 1),  y = +1 w.p. rho,
    t(u) = argmin_t  (t - u)^2 / (2 V) + l(t)              (proximal operator of the loss),
    V_hat = alpha E[1 - dt/du] / V,  m_hat = alpha E[t - u] / V,  q_hat = alpha E[(t - u)^2] / V^2,
    V = Delta / (lam + Delta V_hat),  m = m_hat / (lam + Delta V_hat),
    q = (m_hat^2 + Delta q_hat) / (lam + Delta V_hat)^2,
    E[y (t - u)] = 0                                          (only when b is fitted; else b = 0).

Derivation in short: ``V / Delta`` is ``tr(Hessian^-1) / N``; a sample's field at the optimum
is the proximal map of its leave-one-out field ``omega``; stationarity in ``w`` projected on
``v`` and on the orthogonal noise gives ``m`` and ``q`` (the ``Delta V_hat`` term is the Onsager
reaction of each sample on its own field). Then

    eps_g = generalization_error(m, q, b, Delta, rho)      (exact formula, docs/design.md),
    training error = P(t(u) < 0),  training loss per sample = E[l(t(u))].

Expectations over ``xi``: truncated-Gaussian closed forms for the hinge (its proximal map has
kinks), a uniform grid on [-10, 10] with Gaussian weights for the smooth losses. The tests
check the curves against simulations of :mod:`flatminima.gmm.estimators` at finite N and
against the ``lam -> infinity`` limit, where every loss gives the Hebbian direction and,
balanced, ``eps_BO``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize
from scipy.special import expit, log_expit, ndtr

from flatminima.gmm.data import check_model_args
from flatminima.gmm.theory import generalization_error

__all__ = ["ERMTheory", "THEORY_LOSSES", "erm_theory", "erm_learning_curve"]

log = logging.getLogger(__name__)

THEORY_LOSSES = ("square", "logistic", "hinge")


@dataclass(frozen=True)
class ERMTheory:
    """Fixed point of the replica equations for one ``(loss, lam, alpha, Delta, rho)``."""

    loss: str
    lam: float
    alpha: float
    delta: float
    rho: float
    fit_intercept: bool
    m: float
    q: float
    b: float
    V: float
    eps_g: float
    train_error: float
    train_loss: float
    iterations: int
    converged: bool


class _Grid:
    """Quadrature nodes ``xi`` and weights for E over xi ~ N(0, 1)."""

    def __init__(self, n: int) -> None:
        self.xi = np.linspace(-10.0, 10.0, n)
        w = np.exp(-0.5 * self.xi**2)
        w[0] *= 0.5
        w[-1] *= 0.5
        self.w = w / w.sum()


def _prox(loss: str, u: np.ndarray, V: float) -> tuple[np.ndarray, np.ndarray]:
    """Proximal map in margin form and its derivative: ``t = argmin (t-u)^2/(2V) + l(t)``."""
    if loss == "square":  # l(t) = (1 - t)^2 / 2
        return (u + V) / (1.0 + V), np.full_like(u, 1.0 / (1.0 + V))
    if loss == "hinge":  # l(t) = max(0, 1 - t)
        t = np.where(u >= 1.0, u, np.where(u <= 1.0 - V, u + V, 1.0))
        dt = np.where((u > 1.0) | (u < 1.0 - V), 1.0, 0.0)
        return t, dt
    # logistic, l(t) = log(1 + e^-t): solve t - u - V sigma(-t) = 0 (increasing in t) by
    # safeguarded Newton on the bracket [u, u + V].
    # Bisection where Newton leaves the bracket or does not halve its step (it can cycle
    # between two points inside the bracket); a converged point sits on its bracket and stays.
    lo, hi = u.copy(), u + V
    t = u + V * expit(-u) / (1.0 + V * 0.25)
    prev = np.full_like(u, np.inf)
    for _ in range(100):
        s = expit(-t)
        g = t - u - V * s
        lo = np.where(g < 0, t, lo)
        hi = np.where(g > 0, t, hi)
        step = g / (1.0 + V * s * (1.0 - s))
        t_new = t - step
        tol = 1e-13 * (1.0 + np.max(np.abs(t)))
        bad = (t_new < lo) | (t_new > hi) | ((np.abs(step) > 0.5 * prev) & (np.abs(step) >= tol))
        t_new = np.where(bad, 0.5 * (lo + hi), t_new)
        prev = np.abs(t_new - t)
        if np.max(np.abs(t_new - t)) < tol:
            t = t_new
            break
        t = t_new
    s = expit(-t)
    return t, 1.0 / (1.0 + V * s * (1.0 - s))


def _phi(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x**2) / math.sqrt(2.0 * math.pi)


def _hinge_moments(mu: np.ndarray, s: float, V: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ``E[t - u], E[(t - u)^2], E[1 - dt/du]`` for the hinge, ``u ~ N(mu, s^2)``.

    Regions: ``u < 1 - V`` (``t - u = V``), ``1 - V <= u <= 1`` (``t = 1``), ``u > 1``
    (``t = u``). With ``u = mu + s g``, ``a = (1 - V - mu) / s``, ``c = (1 - mu) / s`` and
    ``Z = Phi(c) - Phi(a)``: ``E[(1 - u) 1_B] = s (c Z - phi(a) + phi(c))`` and
    ``E[(1 - u)^2 1_B] = s^2 (c^2 Z - 2 c (phi(a) - phi(c)) + Z + a phi(a) - c phi(c))``.
    """
    a, c = (1.0 - V - mu) / s, (1.0 - mu) / s
    pa, pc = _phi(a), _phi(c)
    PA = ndtr(a)
    Z = ndtr(c) - PA
    e1 = s * (c * Z - pa + pc)
    e2 = s * s * (c * c * Z - 2.0 * c * (pa - pc) + Z + a * pa - c * pc)
    return V * PA + e1, V * V * PA + e2, Z


def _loss(loss: str, t: np.ndarray) -> np.ndarray:
    if loss == "square":
        return 0.5 * (1.0 - t) ** 2
    if loss == "hinge":
        return np.maximum(0.0, 1.0 - t)
    return -log_expit(t)


def _check(loss: str, alpha: float, lam: float) -> None:
    if loss not in THEORY_LOSSES:
        raise ValueError(f"Invalid loss: {loss!r} (valid: {', '.join(THEORY_LOSSES)})")
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"Invalid alpha value: {alpha!r} (the sample ratio P/N must be > 0)")
    if not (isinstance(lam, int | float) and math.isfinite(lam) and lam > 0):
        raise ValueError(
            f"Invalid lam value: {lam!r} (the theory needs a ridge lam > 0; approach the "
            "max-margin / min-norm limits with a small lam such as 1e-4)"
        )


def erm_theory(
    loss: str,
    alpha: float,
    lam: float,
    delta: float = 1.0,
    rho: float = 0.5,
    fit_intercept: bool | None = None,
    *,
    init: tuple[float, float, float, float] | None = None,
    damping: float = 0.5,
    tol: float = 1e-9,
    max_iter: int = 20000,
    n_grid: int = 1001,
) -> ERMTheory:
    """Solve the replica fixed-point equations of ridge ERM (module docstring).

    Args:
        loss: ``square`` (``(1 - t)^2 / 2`` on the margin ``t = y h``, i.e. ridge regression on
            the labels), ``logistic`` or ``hinge``; the objective sums the loss over samples,
            as :func:`flatminima.gmm.estimators.erm` does.
        alpha: Sample ratio P/N > 0.
        lam: Ridge strength > 0.
        delta: Noise variance Delta > 0.
        rho: Probability of the label +1, in (0, 1).
        fit_intercept: Fit the bias ``b``; default: only when ``rho != 0.5`` (as the study).
        init: Starting ``(m, q, V, b)``, e.g. the solution at a neighbouring alpha.
        damping: Weight of the old iterate in the damped update, in [0, 1).
        tol: Stop when ``m, q, V`` change by less than ``tol`` relatively.
        max_iter: Iteration cap; the result says ``converged=False`` if reached.
        n_grid: Quadrature nodes.

    Returns:
        The fixed point with ``eps_g``, the training error and the training loss per sample.

    Raises:
        ValueError: naming a bad ``loss``, ``alpha``, ``lam``, ``delta``, ``rho`` or ``damping``.
    """
    _check(loss, alpha, lam)
    check_model_args(delta, rho)
    if not 0.0 <= damping < 1.0:
        raise ValueError(f"Invalid damping value: {damping!r} (expected in [0, 1))")
    if fit_intercept is None:
        fit_intercept = rho != 0.5
    eqs = _Equations(loss, delta, rho, bool(fit_intercept), _Grid(n_grid))
    start = init if init is not None else (0.1, 1.0, 1.0, 0.0)
    (m, q, V, b), it, converged = _iterate(eqs, alpha, lam, start, damping, tol, max_iter)
    if not converged:
        log.warning(
            "replica equations (%s, lam=%g, alpha=%g) did not converge in %d iterations "
            "(m=%.4g, q=%.4g, V=%.4g)",
            loss,
            lam,
            alpha,
            it,
            m,
            q,
            V,
        )
    b = eqs.solve_b(m, q, V, b) if converged else b
    train_err, train_loss = eqs.training_metrics(m, q, V, b)
    return ERMTheory(
        loss=loss,
        lam=float(lam),
        alpha=float(alpha),
        delta=float(delta),
        rho=float(rho),
        fit_intercept=bool(fit_intercept),
        m=float(m),
        q=float(q),
        b=float(b),
        V=float(V),
        eps_g=float(generalization_error(m, q, b, delta, rho)),
        train_error=train_err,
        train_loss=train_loss,
        iterations=it,
        converged=converged,
    )


class _Equations:
    """The class-averaged moments of the proximal map that enter the fixed-point equations."""

    def __init__(self, loss: str, delta: float, rho: float, fit_intercept: bool, grid: _Grid):
        self.loss, self.delta, self.fit_intercept, self.grid = loss, delta, fit_intercept, grid
        self.ys = np.array([1.0, -1.0])
        self.py = np.array([rho, 1.0 - rho])

    def moments(self, m: float, q: float, V: float, b: float) -> tuple[float, float, float, float]:
        """Class-averaged E[t - u], E[(t - u)^2], E[1 - dt/du] and E[y (t - u)]."""
        mu = m + self.ys * b  # [2]
        s = math.sqrt(self.delta * q)
        if self.loss == "hinge":  # truncated-Gaussian moments: exact and smooth in (m, q, V, b)
            r, r2, d = _hinge_moments(mu, s, V)
        else:
            g = self.grid
            u = mu[:, None] + s * g.xi[None, :]  # [2, G]
            t, dt = _prox(self.loss, u, V)
            r, r2, d = (t - u) @ g.w, ((t - u) ** 2) @ g.w, (1.0 - dt) @ g.w
        py = self.py
        return float(py @ r), float(py @ r2), float(py @ d), float(np.sum(py * self.ys * r))

    def bias_residual(self, b: float, m: float, q: float, V: float) -> float:
        return self.moments(m, q, V, b)[3]

    def solve_b(self, m: float, q: float, V: float, b0: float) -> float:
        """Root of ``E[y (t - u)]`` in ``b``: Newton (its derivative in ``b`` is
        ``-E[1 - dt/du]``), with a bracketing fallback; 0 without an intercept."""
        if not self.fit_intercept:
            return 0.0
        b = b0
        for _ in range(30):
            _, _, d, res = self.moments(m, q, V, b)
            if not d > 1e-12:
                break
            b_new = b + res / d
            if abs(b_new - b) < 1e-12 * (1.0 + abs(b)):
                return b_new
            b = b_new
        # E[y (t - u)] decreases in b: bracket and bisect.
        lo, hi = b0 - 1.0, b0 + 1.0
        while self.bias_residual(lo, m, q, V) < 0:
            lo -= 2.0 * (hi - lo)
        while self.bias_residual(hi, m, q, V) > 0:
            hi += 2.0 * (hi - lo)
        return float(optimize.brentq(self.bias_residual, lo, hi, args=(m, q, V), xtol=1e-12))

    def training_metrics(self, m: float, q: float, V: float, b: float) -> tuple[float, float]:
        """Training error and training loss per sample at the fixed point."""
        py, mu = self.py, m + self.ys * b
        sd = math.sqrt(self.delta * q)
        if self.loss == "hinge":  # errors: u < -V; loss: 1 - V - u on u < 1 - V
            a = (1.0 - V - mu) / sd
            return float(py @ ndtr((-V - mu) / sd)), float(py @ (sd * (a * ndtr(a) + _phi(a))))
        g = self.grid
        t, _ = _prox(self.loss, mu[:, None] + sd * g.xi[None, :], V)
        return float(py @ ((t < 0).astype(float) @ g.w)), float(py @ (_loss(self.loss, t) @ g.w))


def _iterate(
    eqs: _Equations,
    alpha: float,
    lam: float,
    start: tuple[float, float, float, float],
    damping: float,
    tol: float,
    max_iter: int,
) -> tuple[tuple[float, float, float, float], int, bool]:
    """Damped fixed-point iteration; return ``((m, q, V, b), iterations, converged)``."""
    m, q, V, b = start
    delta = eqs.delta
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 (reported as ``iterations``)
        b = eqs.solve_b(m, q, V, b)
        r, r2, d, _ = eqs.moments(m, q, V, b)
        Vh, mh, qh = alpha * d / V, alpha * r / V, alpha * r2 / V**2
        den = lam + delta * Vh
        m_new, q_new, V_new = mh / den, (mh**2 + delta * qh) / den**2, delta / den
        change = max(
            abs(m_new - m) / (abs(m) + 1e-12),
            abs(q_new - q) / q,
            abs(V_new - V) / V,
        )
        m = damping * m + (1 - damping) * m_new
        q = damping * q + (1 - damping) * q_new
        V = damping * V + (1 - damping) * V_new
        if not all(math.isfinite(x) for x in (m, q, V)) or q > 1e12:
            break
        if change < tol:
            return (m, q, V, b), it, True
    return (m, q, V, b), it, False


def erm_learning_curve(
    loss: str,
    alphas: Sequence[float],
    lam: float,
    delta: float = 1.0,
    rho: float = 0.5,
    fit_intercept: bool | None = None,
    **kwargs: object,
) -> list[ERMTheory]:
    """:func:`erm_theory` along ``alphas`` (solved in increasing order, each warm-started from
    the previous fixed point), returned in the order given."""
    order = sorted(range(len(alphas)), key=lambda i: alphas[i])
    out: dict[int, ERMTheory] = {}
    init = None
    for i in order:
        r = erm_theory(loss, alphas[i], lam, delta, rho, fit_intercept, init=init, **kwargs)  # type: ignore[arg-type]
        out[i] = r
        if r.converged:
            init = (r.m, r.q, r.V, r.b)
    return [out[i] for i in range(len(alphas))]
