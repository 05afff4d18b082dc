"""Data model of the Gaussian-mixture classification problem.

Each sample is drawn as (docs/design.md, "Gaussian mixture"; Mignacco, Krzakala, Lu, Zdeborova,
ICML 2020, arXiv:2002.11544; Pittorino et al., ICLR 2021, arXiv:2006.07897, Sec. 3)::

    y  = +1 with probability rho, -1 otherwise
    x  = y * v / sqrt(N) + sqrt(Delta) * z,     z ~ N(0, I_N),   v ~ N(0, I_N)

with P = alpha * N samples. Arrays are numpy ``float64`` throughout the subpackage:
``X`` has shape ``[P, N]``, ``y`` shape ``[P]`` with values in {-1.0, +1.0}, ``v`` shape ``[N]``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["GMMData", "sample", "sample_given_v", "check_model_args"]

SeedLike = int | np.random.Generator | None


class GMMData(NamedTuple):
    """One training set: ``X`` [P, N], labels ``y`` [P] in {-1, +1}, centre ``v`` [N]."""

    X: np.ndarray
    y: np.ndarray
    v: np.ndarray


def _rng(seed: SeedLike) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (not isinstance(seed, int | np.integer) or seed < 0):
        raise ValueError(
            f"Invalid seed: {seed!r} (expected a non-negative int, a Generator or None)"
        )
    return np.random.default_rng(seed)


def check_model_args(delta: float, rho: float) -> None:
    """Raise ``ValueError`` unless ``delta > 0`` and ``0 < rho < 1``."""
    if not (isinstance(delta, int | float) and math.isfinite(delta) and delta > 0):
        raise ValueError(f"Invalid delta value: {delta!r} (the noise variance must be > 0)")
    if not (isinstance(rho, int | float) and 0.0 < rho < 1.0):
        raise ValueError(
            f"Invalid rho value: {rho!r} (the fraction of +1 labels must be in (0, 1))"
        )


def sample_given_v(
    v: np.ndarray,
    n_samples: int,
    delta: float,
    rho: float = 0.5,
    seed: SeedLike = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n_samples`` points of the mixture with a fixed centre ``v``.

    Args:
        v: Centre of the mixture, shape ``[N]``.
        n_samples: Number of points P (>= 1).
        delta: Noise variance Delta > 0.
        rho: Probability of the label +1, in (0, 1).
        seed: Integer seed, ``numpy.random.Generator`` or ``None``.

    Returns:
        ``(X, y)`` with ``X`` of shape ``[P, N]`` and ``y`` of shape ``[P]`` in {-1, +1}.

    Raises:
        ValueError: on a bad ``v``, ``n_samples``, ``delta``, ``rho`` or ``seed``.
    """
    check_model_args(delta, rho)
    v = np.asarray(v, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"Invalid v: shape {v.shape} (expected a non-empty 1-d array)")
    if not isinstance(n_samples, int | np.integer) or n_samples < 1:
        raise ValueError(f"Invalid n_samples value: {n_samples!r} (expected an int >= 1)")
    rng = _rng(seed)
    n = v.size
    y = np.where(rng.random(n_samples) < rho, 1.0, -1.0)
    X = math.sqrt(delta) * rng.standard_normal((n_samples, n))
    X += np.outer(y, v) / math.sqrt(n)
    return X, y


def sample(
    n_features: int,
    alpha: float,
    delta: float,
    rho: float = 0.5,
    seed: SeedLike = None,
    n_samples: int | None = None,
) -> GMMData:
    """Draw a centre ``v ~ N(0, I_N)`` and ``P = round(alpha * N)`` labelled samples.

    Args:
        n_features: Dimension N (>= 1).
        alpha: Sample ratio alpha = P / N (> 0).
        delta: Noise variance Delta (> 0).
        rho: Probability of the label +1, in (0, 1); 0.5 is the balanced mixture.
        seed: Integer seed, ``numpy.random.Generator`` or ``None``. ``v`` is drawn first, so
            the same seed gives the same ``v`` whatever ``alpha``.
        n_samples: Overrides P when given (then ``alpha`` is only validated).

    Returns:
        :class:`GMMData` ``(X, y, v)``; unpack as ``X, y, v = sample(...)``.

    Raises:
        ValueError: naming any bad argument.

    Example:
        >>> X, y, v = sample(100, alpha=2.0, delta=1.0, seed=0)
        >>> X.shape, y.shape, v.shape
        ((200, 100), (200,), (100,))
    """
    if not isinstance(n_features, int | np.integer) or n_features < 1:
        raise ValueError(f"Invalid n_features value: {n_features!r} (expected an int >= 1)")
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"Invalid alpha value: {alpha!r} (the sample ratio P/N must be > 0)")
    check_model_args(delta, rho)
    rng = _rng(seed)
    if n_samples is None:
        n_samples = max(1, round(alpha * n_features))
    v = rng.standard_normal(int(n_features))
    X, y = sample_given_v(v, n_samples, delta, rho, rng)
    return GMMData(X, y, v)
