"""Replica-theory ERM learning curves (flatminima.gmm.replica) against independent truths:
the lam -> infinity limit (Hebbian, hence eps_BO when balanced), simulations of the ERM solvers
at finite N, dense quadrature of the hinge's closed-form moments, and bad values."""

from __future__ import annotations

import numpy as np
import pytest

from flatminima.gmm import (
    bayes_optimal_error,
    classifier_error,
    erm,
    overlaps,
    sample,
    training_error,
)
from flatminima.gmm.replica import (
    _Grid,
    _hinge_moments,
    _prox,
    erm_learning_curve,
    erm_theory,
)


@pytest.mark.parametrize("loss", ["square", "logistic", "hinge"])
@pytest.mark.parametrize("alpha", [0.5, 2.0, 8.0])
def test_strong_ridge_limit_is_hebbian_and_bayes_optimal(loss: str, alpha: float) -> None:
    # lam -> infinity: w -> -(l'(0) / lam) sum_mu y_mu x_mu / sqrt(N), the Hebbian direction,
    # whose error is eps_BO on the balanced mixture.
    r = erm_theory(loss, alpha, 1e5)
    assert r.converged
    assert r.eps_g == pytest.approx(bayes_optimal_error(alpha, 1.0), abs=1e-6)
    # and strictly above eps_BO at a finite ridge
    assert erm_theory(loss, alpha, 0.1).eps_g > bayes_optimal_error(alpha, 1.0) + 1e-4


def _simulate(loss: str, alpha: float, lam: float, rho: float, n: int, seeds: int):
    rows = []
    for seed in range(seeds):
        X, y, v = sample(n, alpha, 1.0, rho, seed=seed)
        c = erm(X, y, loss, lam, rho != 0.5)
        m, q = overlaps(c.w, v)
        rows.append(
            (m, q, c.b, classifier_error(c.w, c.b, v, 1.0, rho), training_error(c.w, c.b, X, y))
        )
    return np.mean(rows, axis=0)


@pytest.mark.parametrize(
    "loss,alpha,lam,rho,n",
    [
        ("square", 2.0, 0.1, 0.5, 800),
        ("logistic", 2.0, 0.1, 0.5, 400),
        ("hinge", 2.0, 0.1, 0.5, 400),
        ("logistic", 3.0, 0.1, 0.3, 400),
        ("square", 3.0, 0.1, 0.3, 400),
    ],
)
def test_fixed_point_matches_simulations(loss, alpha, lam, rho, n) -> None:
    th = erm_theory(loss, alpha, lam, rho=rho)
    assert th.converged and th.fit_intercept == (rho != 0.5)
    m, q, b, eps, tr = _simulate(loss, alpha, lam, rho, n, seeds=6)
    # finite-size corrections are O(1/sqrt(N)) per seed; measured |z| < 3 for all of these
    assert th.m == pytest.approx(m, rel=0.05)
    assert th.q == pytest.approx(q, rel=0.06)
    assert th.eps_g == pytest.approx(eps, abs=0.008)
    assert th.train_error == pytest.approx(tr, abs=0.01)
    if rho != 0.5:
        assert th.b == pytest.approx(b, abs=0.06)
    else:
        assert th.b == 0.0


def test_square_loss_fixed_point_in_closed_form() -> None:
    # Square loss, balanced: t - u = V (1 - u) / (1 + V), so V_hat = alpha / (1 + V),
    # m_hat = alpha (1 - m) / (1 + V) and V solves V = Delta / (lam + Delta alpha / (1 + V)).
    alpha, lam, delta = 1.5, 0.3, 0.7
    r = erm_theory("square", alpha, lam, delta)
    V = r.V
    assert V == pytest.approx(delta / (lam + delta * alpha / (1 + V)), rel=1e-8)
    den = lam + delta * alpha / (1 + V)
    m = alpha / (1 + V) / (den + alpha / (1 + V))  # m den = alpha (1 - m) / (1 + V)
    assert r.m == pytest.approx(m, rel=1e-7)


def test_hinge_moments_match_dense_quadrature() -> None:
    g = _Grid(200001)
    mu = np.array([0.7, -0.2])
    s, V = 1.3, 0.6
    u = mu[:, None] + s * g.xi[None, :]
    t, dt = _prox("hinge", u, V)
    r, r2, d = _hinge_moments(mu, s, V)
    np.testing.assert_allclose(r, (t - u) @ g.w, atol=1e-5)
    np.testing.assert_allclose(r2, ((t - u) ** 2) @ g.w, atol=1e-5)
    np.testing.assert_allclose(d, (1 - dt) @ g.w, atol=1e-4)


def test_logistic_prox_solves_its_optimality_condition() -> None:
    u = np.linspace(-30, 30, 601)[None, :]
    for V in (1e-3, 1.0, 1e4):
        t, dt = _prox("logistic", u, V)
        # t - u = V sigma(-t), and dt/du = 1 / (1 + V sigma(t) sigma(-t))
        s = 1 / (1 + np.exp(t))
        np.testing.assert_allclose(t - u, V * s, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(dt, 1 / (1 + V * s * (1 - s)), rtol=1e-9)


def test_learning_curve_keeps_order_and_equals_cold_starts() -> None:
    alphas = [4.0, 0.5, 2.0]
    curve = erm_learning_curve("hinge", alphas, 1e-3)
    assert [r.alpha for r in curve] == alphas
    for r in curve:
        cold = erm_theory("hinge", r.alpha, 1e-3)
        assert r.eps_g == pytest.approx(cold.eps_g, abs=1e-6)
    # more data, lower error
    errs = [r.eps_g for r in sorted(curve, key=lambda r: r.alpha)]
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss="cross", alpha=1.0, lam=0.1), "loss"),
        (dict(loss="square", alpha=0.0, lam=0.1), "alpha"),
        (dict(loss="square", alpha=1.0, lam=0.0), "lam"),
        (dict(loss="square", alpha=1.0, lam=float("nan")), "lam"),
        (dict(loss="square", alpha=1.0, lam=0.1, delta=-1.0), "elta"),
        (dict(loss="square", alpha=1.0, lam=0.1, rho=1.0), "rho"),
        (dict(loss="square", alpha=1.0, lam=0.1, damping=1.0), "damping"),
    ],
)
def test_bad_values_are_named(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        erm_theory(**kwargs)
