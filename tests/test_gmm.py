"""Tests of flatminima.gmm against closed forms, Monte Carlo and reference solvers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize

from flatminima.gmm import (
    H,
    bayes_optimal,
    bayes_optimal_bias,
    bayes_optimal_error,
    classifier_error,
    erm_hinge,
    erm_logistic,
    erm_square,
    generalization_error,
    hebbian,
    is_separable,
    local_energy,
    local_energy_mc,
    overlaps,
    sample,
    sample_given_v,
    sigma_at_error,
    training_error,
)


def test_sample_shapes_and_label_fraction():
    X, y, v = sample(50, 4.0, 0.5, rho=0.3, seed=0)
    assert X.shape == (200, 50) and y.shape == (200,) and v.shape == (50,)
    assert set(np.unique(y)) == {-1.0, 1.0}
    _, y2 = sample_given_v(v, 20000, 0.5, 0.3, seed=1)
    assert abs((y2 > 0).mean() - 0.3) < 0.015
    # the noise has variance Delta after removing the class means
    X2, y2 = sample_given_v(v, 4000, 0.5, 0.3, seed=2)
    z = X2 - np.outer(y2, v) / math.sqrt(50)
    assert abs(z.var() - 0.5) < 0.01


@pytest.mark.parametrize("rho,b", [(0.5, 0.0), (0.3, 0.4), (0.7, -0.2)])
def test_generalization_error_matches_monte_carlo(rho, b):
    rng = np.random.default_rng(3)
    n, delta = 200, 0.8
    v = rng.standard_normal(n)
    w = 0.7 * v + rng.standard_normal(n)
    X, y = sample_given_v(v, 100_000, delta, rho, seed=4)
    mc = np.mean(np.where(X @ w / math.sqrt(n) + b > 0, 1.0, -1.0) != y)
    exact = classifier_error(w, b, v, delta, rho)
    se = math.sqrt(exact * (1 - exact) / 100_000)
    assert abs(mc - exact) < 4 * se


def test_bayes_optimal_balanced_closed_form_and_hebbian():
    # closed form: eps_BO = H(sqrt(alpha / (Delta (alpha + Delta))))
    assert bayes_optimal_error(2.0, 1.0) == pytest.approx(float(H(math.sqrt(2 / 3))))
    # the Hebbian estimator reaches it within finite-size error (mean over data sets)
    for alpha in (0.5, 2.0):
        errs = []
        for s in range(20):
            X, y, v = sample(1000, alpha, 1.0, seed=s)
            errs.append(classifier_error(hebbian(X, y).w, 0.0, v, 1.0))
        se = np.std(errs, ddof=1) / math.sqrt(len(errs))
        assert abs(np.mean(errs) - bayes_optimal_error(alpha, 1.0)) < 4 * se + 2e-3


def test_bayes_optimal_imbalanced_bias_is_the_numerical_optimum():
    alpha, delta, rho = 1.5, 0.7, 0.25
    m = q = alpha / (alpha + delta)
    res = optimize.minimize_scalar(
        lambda b: generalization_error(m, q, b, delta, rho), bounds=(-3, 3), method="bounded"
    )
    assert bayes_optimal_bias(delta, rho) == pytest.approx(res.x, abs=1e-4)
    assert bayes_optimal_error(alpha, delta, rho) == pytest.approx(res.fun, abs=1e-9)
    # and the finite-N Bayes classifier attains it (Monte Carlo over data sets)
    errs = []
    for s in range(10):
        X, y, v = sample(2000, alpha, delta, rho, seed=s)
        c = bayes_optimal(X, y, delta, rho)
        errs.append(classifier_error(c.w, c.b, v, delta, rho))
    assert abs(np.mean(errs) - bayes_optimal_error(alpha, delta, rho)) < 3e-3
    # it beats the balanced formula's prediction for the same overlaps without bias
    assert bayes_optimal_error(alpha, delta, rho) < generalization_error(m, q, 0.0, delta, rho)


def test_square_ridge_matches_closed_form_and_hebbian_limit():
    X, y, v = sample(60, 2.0, 1.0, seed=0)
    A = X / math.sqrt(60)
    lam = 0.3
    w_ref = np.linalg.solve(A.T @ A + lam * np.eye(60), A.T @ y)
    np.testing.assert_allclose(erm_square(X, y, lam).w, w_ref, rtol=1e-10)
    # lam -> infinity: the direction tends to the Hebbian one
    w_big = erm_square(X, y, 1e8).w
    w_heb = hebbian(X, y).w
    cos = w_big @ w_heb / np.linalg.norm(w_big) / np.linalg.norm(w_heb)
    assert cos > 1 - 1e-6
    # lam = 0 with P < N: the minimum-norm interpolator
    Xs, ys, _ = sample(60, 0.5, 1.0, seed=1)
    w0 = erm_square(Xs, ys, 0.0).w
    np.testing.assert_allclose(Xs @ w0 / math.sqrt(60), ys, atol=1e-8)
    np.testing.assert_allclose(w0, np.linalg.pinv(Xs / math.sqrt(60)) @ ys, atol=1e-8)


def test_logistic_gradient_vanishes_and_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    X, y, _ = sample(40, 3.0, 1.0, seed=2)
    lam = 0.5
    c = erm_logistic(X, y, lam)
    A = X / math.sqrt(40)
    h = y * (A @ c.w)
    grad = -(A * (y / (1 + np.exp(h)))[:, None]).sum(0) + lam * c.w
    assert np.max(np.abs(grad)) < 1e-5
    ref = sklearn.LogisticRegression(C=1 / lam, fit_intercept=False, tol=1e-12, max_iter=10000)
    ref.fit(A, y)
    np.testing.assert_allclose(c.w, ref.coef_.ravel(), atol=1e-4)


def test_hinge_max_margin_separates_and_matches_svc():
    X, y, _ = sample(40, 1.0, 1.0, seed=3)
    assert is_separable(X, y)
    c = erm_hinge(X, y, 0.0)
    margins = y * (X @ c.w / math.sqrt(40))
    assert margins.min() > 1 - 1e-5  # separates with functional margin 1
    # reference: the primal QP min ||w||^2 / 2 s.t. y_mu a_mu . w >= 1, by SLSQP
    Ay = X * (y / math.sqrt(40))[:, None]
    ref = optimize.minimize(
        lambda w: 0.5 * w @ w,
        np.ones(40),
        jac=lambda w: w,
        method="SLSQP",
        constraints=[{"type": "ineq", "fun": lambda w: Ay @ w - 1, "jac": lambda w: Ay}],
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    w_ref = ref.x
    cos = c.w @ w_ref / np.linalg.norm(c.w) / np.linalg.norm(w_ref)
    assert cos > 1 - 1e-4
    # soft margin with lam: KKT satisfied, and non-separable data reject lam = 0
    Xn, yn, _ = sample(20, 8.0, 1.0, seed=4)
    assert not is_separable(Xn, yn)
    with pytest.raises(ValueError, match="lam"):
        erm_hinge(Xn, yn, 0.0)
    assert erm_hinge(Xn, yn, 0.1).converged


def test_local_energy_exact_matches_monte_carlo_and_sigma_star():
    X, y, v = sample(50, 2.0, 1.0, seed=5)
    w = hebbian(X, y).w
    exact = local_energy(w, 0.1, X, y, 0.4)
    mc, se = local_energy_mc(w, 0.1, X, y, 0.4, n_draws=4000, seed=1)
    assert abs(mc - exact) < 4 * se + 1e-4
    target = training_error(w, 0.0, X, y) + 0.05
    s = sigma_at_error(w, 0.0, X, y, target)
    assert local_energy(w, 0.0, X, y, s) + training_error(w, 0.0, X, y) == pytest.approx(target)


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: sample(0, 1.0, 1.0), "n_features"),
        (lambda: sample(10, -1.0, 1.0), "alpha"),
        (lambda: sample(10, 1.0, 0.0), "delta"),
        (lambda: sample(10, 1.0, 1.0, rho=1.0), "rho"),
        (lambda: generalization_error(0.5, 0.0, 0.0, 1.0), "q"),
        (lambda: bayes_optimal_error(0.0, 1.0), "alpha"),
        (lambda: erm_logistic(*sample(10, 1.0, 1.0, seed=0)[:2], 0.0), "lam"),
        (lambda: erm_square(*sample(10, 1.0, 1.0, seed=0)[:2], -1.0), "lam"),
        (lambda: sigma_at_error(np.ones(3), 0.0, np.ones((2, 3)), np.ones(2), 0.7), "target"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_value(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_overlaps():
    m, q = overlaps(np.array([1.0, 2.0]), np.array([3.0, 0.0]))
    assert (m, q) == (1.5, 2.5)
