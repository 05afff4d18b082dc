"""Tests of flatminima.gmm.free_entropy against closed forms and brute-force Monte Carlo.

Independent truths: for one sample, or samples with orthogonal inputs, the perturbed margins are
independent Gaussians, so ``Phi = sum_mu [beta E_mu(w) + log(1 - p_mu (1 - e^-beta))]`` with
``p_mu = H(m_mu / s_mu)``; for N = 2, 3 plain Monte Carlo of ``log E_prior exp(-beta dE)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from flatminima.gmm.free_entropy import (
    DEFAULT_BETA,
    DEFAULT_GAMMA,
    error_count,
    local_free_entropy,
    prior_delta_energy,
)
from flatminima.gmm.theory import H


def independent_phi(margins, scales, gamma, beta):
    """Exact Phi when margin mu moves by N(0, scales_mu^2 / (beta gamma)) independently."""
    m = np.asarray(margins, float)
    s = np.asarray(scales, float) / math.sqrt(beta * gamma)
    p_err = H(m / s)
    e0 = (m <= 0).astype(float)
    return float(np.sum(beta * e0 + np.log1p(-p_err * (1.0 - math.exp(-beta)))))


def close(r, exact, extra=0.0):
    return abs(r.phi - exact) < 4.0 * r.phi_se + extra


@pytest.mark.parametrize("wrong", [False, True])
@pytest.mark.parametrize("block_size", [None, 3])
def test_one_sample_closed_form(wrong, block_size):
    rng = np.random.default_rng(0)
    n, gamma, beta, b = 12, 2.0, 1.5, 0.1
    x = rng.standard_normal(n)
    w = rng.standard_normal(n)
    w *= math.sqrt(n) / np.linalg.norm(w)
    h = w @ x / math.sqrt(n) + b
    # label so that the margin is +-0.3-ish: the noise (std ~0.6) flips it often
    w += (0.3 * np.sign(h) - h) * x * math.sqrt(n) / (x @ x)
    w *= math.sqrt(n) / np.linalg.norm(w)  # normalised: the exact value uses this w as is
    h = w @ x / math.sqrt(n) + b
    y = np.array([-np.sign(h) if wrong else np.sign(h)])
    exact = independent_phi(y * h, [np.linalg.norm(x) / math.sqrt(n)], gamma, beta)
    r = local_free_entropy(
        w, b, x[None], y, gamma=gamma, beta=beta, n_steps=300, n_chains=16, block_size=block_size
    )
    assert r.base_energy == int(wrong)
    assert (exact > 0) == wrong  # an error that noise removes gives Phi > 0
    assert close(r, exact, 0.01), (r.phi, r.phi_se, exact)
    assert r.phi_se < 0.05 * abs(exact) + 0.01


def test_orthogonal_samples_sum_of_one_sample_terms():
    rng = np.random.default_rng(1)
    p, n, gamma, beta, b = 10, 16, 1.0, 2.0, -0.2
    scale = rng.uniform(0.5, 2.0, p)
    X = np.zeros((p, n))
    X[np.arange(p), np.arange(p)] = scale * math.sqrt(n)  # ||x_mu||^2 / N = scale^2
    w = rng.standard_normal(n)
    w *= math.sqrt(n) / np.linalg.norm(w)
    h = X @ w / math.sqrt(n) + b
    y = np.sign(h)
    y[:3] *= -1  # three errors
    exact = independent_phi(y * h, scale, gamma, beta)
    r = local_free_entropy(w, b, X, y, gamma=gamma, beta=beta, n_steps=300, n_chains=16)
    assert r.base_energy == 3
    assert close(r, exact, 0.02), (r.phi, r.phi_se, exact)
    assert r.phi_se < 0.1
    assert r.prior_delta_energy == pytest.approx(
        float(np.sum(H(y * h / (scale / math.sqrt(beta * gamma)))) - 3)
    )


@pytest.mark.parametrize("n,block_size", [(2, None), (3, 1)])
def test_dense_small_against_monte_carlo(n, block_size):
    rng = np.random.default_rng(2 + n)
    p, gamma, beta, b = 7, 1.5, 2.0, 0.15
    X = rng.standard_normal((p, n))
    w = rng.standard_normal(n)
    y = np.where(rng.random(p) < 0.7, 1.0, -1.0) * np.sign(X @ w / math.sqrt(n) + b)
    w_n = w * math.sqrt(n) / np.linalg.norm(w)
    b_n = b * math.sqrt(n) / np.linalg.norm(w)
    # brute force: Phi = log E_prior exp(-beta dE), 10^6 exact prior draws
    draws = w_n + rng.standard_normal((1_000_000, n)) / math.sqrt(beta * gamma)
    e = np.sum(y * (draws @ X.T / math.sqrt(n) + b_n) <= 0, axis=1)
    e0 = error_count(w_n, b_n, X, y)
    z = np.exp(-beta * (e - e0))
    mc, mc_se = math.log(z.mean()), z.std() / z.mean() / 1000.0
    r = local_free_entropy(
        w, b, X, y, gamma=gamma, beta=beta, n_steps=300, n_chains=16, block_size=block_size
    )
    assert r.scale == pytest.approx(math.sqrt(n) / np.linalg.norm(w))
    assert abs(r.phi - mc) < 4.0 * math.hypot(r.phi_se, mc_se) + 0.02, (r.phi, r.phi_se, mc)


def test_prior_delta_energy_matches_monte_carlo_and_first_node():
    rng = np.random.default_rng(4)
    p, n, gamma, beta = 40, 30, 2.0, 0.5
    X = rng.standard_normal((p, n))
    w = rng.standard_normal(n)
    y = np.sign(X @ w + 2.0 * rng.standard_normal(p))
    exact = prior_delta_energy(w, 0.0, X, y, gamma=gamma, beta=beta)
    w_n = w * math.sqrt(n) / np.linalg.norm(w)
    draws = w_n + rng.standard_normal((200_000, n)) / math.sqrt(beta * gamma)
    de = np.sum(y * (draws @ X.T / math.sqrt(n)) <= 0, axis=1) - error_count(w_n, 0.0, X, y)
    assert abs(exact - de.mean()) < 4 * de.std() / math.sqrt(de.size)
    # as t -> 0 the tilted measure is the prior: the first (smallest-t) node sees <dE>_0
    r = local_free_entropy(w, 0.0, X, y, gamma=gamma, beta=beta, n_steps=200, n_chains=16)
    assert r.temps[0] < 0.01 * beta
    assert abs(r.mean_delta_energy[0] - exact) < 4 * r.mean_delta_energy_se[0] + 0.1
    # and Phi lies between -beta <dE>_0 (Jensen) and 0 here (the TI integrand only decreases)
    assert -beta * exact - 4 * r.phi_se < r.phi < 0


def test_large_gamma_gives_zero():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((50, 20))
    w = rng.standard_normal(20)
    y = np.where(rng.random(50) < 0.8, 1.0, -1.0) * np.sign(X @ w)
    r = local_free_entropy(w, 0.0, X, y, gamma=1e12, beta=1.0, n_steps=5)
    assert r.phi == 0.0 and r.phi_se == 0.0
    assert abs(r.prior_delta_energy) < 1e-6


def test_sign_when_no_training_errors():
    rng = np.random.default_rng(6)
    X = rng.standard_normal((60, 20))
    w = rng.standard_normal(20)
    y = np.sign(X @ w)  # w classifies every sample correctly: dE >= 0 for every w'
    r = local_free_entropy(w, 0.0, X, y, n_steps=20)
    assert r.base_energy == 0
    assert all(c < 0 for c in r.chain_phi)
    assert all(v >= 0 for v in r.mean_delta_energy)
    # smaller noise (larger gamma at fixed beta) is flatter
    r2 = local_free_entropy(w, 0.0, X, y, gamma=16 * DEFAULT_GAMMA, n_steps=20)
    assert r2.phi > r.phi + 4 * math.hypot(r.phi_se, r2.phi_se)


def test_normalisation_and_reproducibility():
    rng = np.random.default_rng(7)
    X = rng.standard_normal((40, 25))
    w = rng.standard_normal(25)
    y = np.sign(X @ w + rng.standard_normal(40))
    kw = dict(n_steps=10, n_temps=4)
    r1 = local_free_entropy(w, 0.3, X, y, seed=3, **kw)
    r2 = local_free_entropy(w, 0.3, X, y, seed=3, **kw)
    assert r1 == r2
    assert local_free_entropy(w, 0.3, X, y, seed=4, **kw).phi != r1.phi
    # (w, b) -> (c w, c b) is the same classifier: normalised, the same Phi draw for draw
    r3 = local_free_entropy(2.5 * w, 0.75, X, y, seed=3, **kw)
    assert r3.phi == pytest.approx(r1.phi, abs=1e-9)
    assert r3.scale == pytest.approx(r1.scale / 2.5)
    # without normalisation, the larger w is flatter (the same noise is smaller relative to it)
    r4 = local_free_entropy(3 * w, 0.9, X, y, seed=3, normalize=False, **kw)
    r5 = local_free_entropy(w, 0.3, X, y, seed=3, normalize=False, **kw)
    assert r4.phi > r5.phi
    assert r1.to_dict()["phi"] == r1.phi
    assert (DEFAULT_BETA, DEFAULT_GAMMA) == (r1.beta, r1.gamma)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gamma=0.0), "gamma"),
        (dict(gamma=float("inf")), "gamma"),
        (dict(beta=-1.0), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(n_temps=0), "n_temps"),
        (dict(n_steps=0), "n_steps"),
        (dict(n_chains=1), "n_chains"),
        (dict(burn_in=-1), "burn_in"),
        (dict(block_size=0), "block_size"),
        (dict(n_steps=2.5), "n_steps"),
        (dict(t_power=0.5), "t_power"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_parameters_raise(kwargs, match):
    X = np.ones((3, 4))
    with pytest.raises(ValueError, match=match):
        local_free_entropy(np.ones(4), 0.0, X, np.ones(3), **kwargs)


def test_bad_data_raise():
    X, w, y = np.ones((3, 4)), np.ones(4), np.ones(3)
    with pytest.raises(ValueError, match="w"):
        local_free_entropy(np.ones(5), 0.0, X, y)
    with pytest.raises(ValueError, match="y"):
        local_free_entropy(w, 0.0, X, np.ones(2))
    with pytest.raises(ValueError, match="labels"):
        local_free_entropy(w, 0.0, X, np.array([1.0, 0.0, -1.0]))
    with pytest.raises(ValueError, match="X"):
        local_free_entropy(w, 0.0, np.ones(4), y)
    with pytest.raises(ValueError, match="b"):
        local_free_entropy(w, float("nan"), X, y)
    with pytest.raises(ValueError, match="zeros"):
        local_free_entropy(np.zeros(4), 0.0, X, y)
    with pytest.raises(ValueError, match="non-finite"):
        local_free_entropy(w, 0.0, np.full((3, 4), np.inf), y)
