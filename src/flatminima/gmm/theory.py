"""Exact errors of linear classifiers on the Gaussian mixture, and the Bayes-optimal error.

Notation (docs/design.md, "Gaussian mixture"): a linear classifier predicts
``sign(w . x / sqrt(N) + b)``; its overlaps with the centre are ``m = w . v / N`` and
``q = ||w||^2 / N``. For a fresh sample ``x = y v / sqrt(N) + sqrt(Delta) z`` the pre-activation
is ``y m + b + sqrt(Delta q) g`` with ``g ~ N(0, 1)``, hence exactly

    eps_g = rho H((m + b) / sqrt(Delta q)) + (1 - rho) H((m - b) / sqrt(Delta q)),
    H(x) = erfc(x / sqrt 2) / 2.

References: Mignacco, Krzakala, Lu, Zdeborova, "The role of regularization in classification of
high-dimensional noisy Gaussian mixture", ICML 2020 (arXiv:2002.11544); Pittorino et al.,
ICLR 2021 (arXiv:2006.07897), Sec. 3.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erfc

from flatminima.gmm.data import check_model_args

__all__ = [
    "H",
    "overlaps",
    "generalization_error",
    "classifier_error",
    "bayes_optimal_overlaps",
    "bayes_optimal_bias",
    "bayes_optimal_error",
]


def H(x: np.ndarray | float) -> np.ndarray | float:
    """Gaussian tail ``H(x) = P(g > x) = erfc(x / sqrt 2) / 2``, g ~ N(0, 1)."""
    return 0.5 * erfc(np.asarray(x, dtype=np.float64) / math.sqrt(2.0))


def overlaps(w: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    """Return ``(m, q) = (w . v / N, ||w||^2 / N)``.

    Raises:
        ValueError: if ``w`` and ``v`` are not 1-d arrays of the same length.
    """
    w = np.asarray(w, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if w.ndim != 1 or w.shape != v.shape:
        raise ValueError(f"Invalid shapes: w {w.shape}, v {v.shape} (expected equal 1-d shapes)")
    n = w.size
    return float(w @ v) / n, float(w @ w) / n


def generalization_error(
    m: float | np.ndarray,
    q: float | np.ndarray,
    b: float | np.ndarray,
    delta: float,
    rho: float = 0.5,
) -> float | np.ndarray:
    """Exact test error of ``sign(w . x / sqrt(N) + b)`` from its overlaps.

    ``eps_g = rho H((m + b) / sqrt(Delta q)) + (1 - rho) H((m - b) / sqrt(Delta q))``.
    Exact at every N for the given centre ``v`` (not only as N -> infinity). Broadcasts.

    Args:
        m: Overlap ``w . v / N``.
        q: Squared norm ``||w||^2 / N`` (> 0).
        b: Bias.
        delta: Noise variance Delta > 0.
        rho: Probability of the label +1, in (0, 1).

    Raises:
        ValueError: on ``q <= 0``, ``delta <= 0`` or ``rho`` outside (0, 1).
    """
    check_model_args(delta, rho)
    q_arr = np.asarray(q, dtype=np.float64)
    if np.any(~(q_arr > 0)):
        raise ValueError(f"Invalid q value: {q!r} (||w||^2 / N must be > 0)")
    s = np.sqrt(delta * q_arr)
    m_arr = np.asarray(m, dtype=np.float64)
    b_arr = np.asarray(b, dtype=np.float64)
    out = rho * H((m_arr + b_arr) / s) + (1.0 - rho) * H((m_arr - b_arr) / s)
    return float(out) if np.ndim(out) == 0 else out


def classifier_error(
    w: np.ndarray, b: float, v: np.ndarray, delta: float, rho: float = 0.5
) -> float:
    """Exact test error of the classifier ``(w, b)`` for the mixture with centre ``v``."""
    m, q = overlaps(w, v)
    return float(generalization_error(m, q, b, delta, rho))


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"Invalid alpha value: {alpha!r} (the sample ratio P/N must be > 0)")


def bayes_optimal_overlaps(alpha: float, delta: float) -> tuple[float, float]:
    """Overlaps ``(m, q)`` of the posterior mean of ``v`` as N -> infinity.

    The posterior of ``v`` given the labelled data is Gaussian with isotropic covariance
    ``Delta / (Delta + alpha) I`` and mean ``w_B = sum_mu y_mu x_mu / (sqrt(N) (Delta + alpha))``,
    whose overlaps concentrate on ``m = q = alpha / (alpha + Delta)``.
    """
    _check_alpha(alpha)
    check_model_args(delta, 0.5)
    m = alpha / (alpha + delta)
    return m, m


def bayes_optimal_bias(delta: float, rho: float = 0.5) -> float:
    """Bias of the Bayes-optimal classifier built on ``w_B``: ``b = (Delta / 2) log(rho/(1-rho))``.

    Derivation: given the data, a fresh ``x`` is ``N(y w_B / sqrt(N), (Delta + s2 / N) I)`` with
    ``s2 = Delta / (Delta + alpha)``; the log-likelihood ratio of the two labels is
    ``2 w_B . x / (sqrt(N) (Delta + s2 / N)) + log(rho / (1 - rho))``, linear in ``x``. The
    ``s2 / N`` correction vanishes as N -> infinity and is dropped here.
    """
    check_model_args(delta, rho)
    return 0.5 * delta * math.log(rho / (1.0 - rho))


def bayes_optimal_error(alpha: float, delta: float, rho: float = 0.5) -> float:
    """Bayes-optimal test error of the mixture as N -> infinity.

    Balanced (``rho = 0.5``): ``eps_BO = H(sqrt(alpha / (Delta (alpha + Delta))))``.

    Any ``rho`` (how it is computed): the Bayes classifier is linear (see
    :func:`bayes_optimal_bias`), so its error is :func:`generalization_error` at the
    posterior-mean overlaps ``m = q = alpha / (alpha + Delta)`` and the bias
    ``b = (Delta / 2) log(rho / (1 - rho))``; this ``b`` is also the stationary point of
    ``eps_g`` in ``b`` (``rho phi((m+b)/s) = (1-rho) phi((m-b)/s)`` gives ``b = s^2 log(rho/(1-rho))
    / (2 m)`` with ``s^2 = Delta q``). The tests check it against a numerical minimisation over
    ``b`` and a Monte Carlo of the finite-N Bayes classifier.

    Args:
        alpha: Sample ratio P/N > 0.
        delta: Noise variance Delta > 0.
        rho: Probability of the label +1, in (0, 1).

    Raises:
        ValueError: naming a bad ``alpha``, ``delta`` or ``rho``.
    """
    _check_alpha(alpha)
    check_model_args(delta, rho)
    if rho == 0.5:
        return float(H(math.sqrt(alpha / (delta * (alpha + delta)))))
    m, q = bayes_optimal_overlaps(alpha, delta)
    return float(generalization_error(m, q, bayes_optimal_bias(delta, rho), delta, rho))
