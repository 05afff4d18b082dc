"""Flatness of a linear classifier on its training set: local energy, matched-error robustness
and the angle to a reference direction.

For ``h_mu = w . x_mu / sqrt(N) + b`` and multiplicative noise ``w_i (1 + sigma xi_i)``,
``b (1 + sigma xi_0)`` (all parameters perturbed, docs/design.md, "Flatness measures"), the
perturbed pre-activation is Gaussian with mean ``h_mu`` and variance
``s_mu^2 = sigma^2 (sum_i w_i^2 x_mu,i^2 / N + b^2)``, so the expected perturbed training error is
exactly ``E_sigma(w) = mean_mu H(y_mu h_mu / s_mu)`` and the local energy is
``delta_E(w, sigma) = E_sigma(w) - E_train(w)`` (Pittorino et al., ICLR 2021, Sec. 5). No Monte
Carlo is needed; :func:`local_energy_mc` is the sampled version the tests compare against.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize

from flatminima.gmm.theory import H

__all__ = [
    "training_error",
    "perturbed_error",
    "local_energy",
    "local_energy_mc",
    "sigma_at_error",
    "angle_deg",
]


def _check(w: np.ndarray, X: np.ndarray, y: np.ndarray) -> None:
    if X.ndim != 2 or w.shape != (X.shape[1],) or y.shape != (X.shape[0],):
        raise ValueError(f"Invalid shapes: w {w.shape}, X {X.shape}, y {y.shape}")


def _check_sigma(sigma: float) -> None:
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"Invalid sigma value: {sigma!r} (expected >= 0)")


def training_error(w: np.ndarray, b: float, X: np.ndarray, y: np.ndarray) -> float:
    """Fraction of samples with ``y_mu h_mu <= 0``."""
    _check(w, X, y)
    return float(np.mean(y * (X @ w / math.sqrt(w.size) + b) <= 0))


def perturbed_error(w: np.ndarray, b: float, X: np.ndarray, y: np.ndarray, sigma: float) -> float:
    """``E_sigma(w) = E_xi[E_train(w (1 + sigma xi))] = mean_mu H(y_mu h_mu / s_mu)`` exactly."""
    _check(w, X, y)
    _check_sigma(sigma)
    n = w.size
    h = y * (X @ w / math.sqrt(n) + b)
    if sigma == 0:
        return float(np.mean(h <= 0))
    s = sigma * np.sqrt((X * X) @ (w * w) / n + b * b)
    return float(np.mean(H(h / s)))


def local_energy(w: np.ndarray, b: float, X: np.ndarray, y: np.ndarray, sigma: float) -> float:
    """``delta_E(w, sigma) = E_sigma(w) - E_train(w)`` for multiplicative noise (exact).

    Raises:
        ValueError: on bad shapes or ``sigma < 0``.
    """
    return perturbed_error(w, b, X, y, sigma) - training_error(w, b, X, y)


def local_energy_mc(
    w: np.ndarray,
    b: float,
    X: np.ndarray,
    y: np.ndarray,
    sigma: float,
    n_draws: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """Monte Carlo ``delta_E``: mean and standard error over ``n_draws`` noise draws."""
    _check(w, X, y)
    _check_sigma(sigma)
    if n_draws < 2:
        raise ValueError(f"Invalid n_draws value: {n_draws!r} (expected >= 2)")
    rng = np.random.default_rng(seed)
    n = w.size
    W = w * (1 + sigma * rng.standard_normal((n_draws, n)))
    B = b * (1 + sigma * rng.standard_normal(n_draws))
    errs = np.mean(y[:, None] * (X @ W.T / math.sqrt(n) + B) <= 0, axis=0)
    e0 = training_error(w, b, X, y)
    return float(errs.mean() - e0), float(errs.std(ddof=1) / math.sqrt(n_draws))


def sigma_at_error(
    w: np.ndarray, b: float, X: np.ndarray, y: np.ndarray, target: float, sigma_max: float = 1e3
) -> float:
    """Noise ``sigma*`` at which the perturbed training error reaches ``target``: flatness at a
    matched error level (larger = flatter). ``nan`` if ``E_train(w) >= target``.

    ``E_sigma`` rises continuously from ``E_train`` towards 1/2 as ``sigma`` grows, so
    ``target`` must lie in ``(E_train, 1/2)``; solved by Brent's method.

    Raises:
        ValueError: if ``target`` is not in (0, 0.5).
    """
    if not 0 < target < 0.5:
        raise ValueError(
            f"Invalid target value: {target!r} (expected a training error in (0, 0.5))"
        )
    if training_error(w, b, X, y) >= target:
        return float("nan")
    f = lambda s: perturbed_error(w, b, X, y, s) - target  # noqa: E731
    if f(sigma_max) < 0:
        return float("inf")
    return float(optimize.brentq(f, 1e-12, sigma_max, xtol=1e-6, rtol=1e-6))


def angle_deg(w: np.ndarray, ref: np.ndarray) -> float:
    """Angle between ``w`` and ``ref`` in degrees."""
    c = float(w @ ref) / (np.linalg.norm(w) * np.linalg.norm(ref))
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))
