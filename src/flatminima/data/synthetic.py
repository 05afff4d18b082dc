"""Seeded synthetic classification sets: Gaussian mixture and teacher-student.

Gaussian mixture (Pittorino et al., ICLR 2021, arXiv 2006.07897, Sec. 3; see docs/design.md,
"Gaussian mixture")::

    x_mu = y_mu * v / sqrt(N) + sqrt(Delta) * z_mu,   z_mu ~ N(0, I_N),  v ~ N(0, I_N),
    y_mu = +1 with probability rho, -1 otherwise,

returned as a 2-class set with class ``1`` for ``y = +1`` and class ``0`` for ``y = -1``. The
centre ``v`` is shared by the training and test samples. ``P = alpha * N`` training samples.

Teacher-student: ``x ~ N(0, I_D)`` labelled by a random teacher MLP
``f(x) = W_L phi(... phi(W_1 x))`` with ``W_l ~ N(0, 1 / fan_in)``; the label is
``argmax_k f_k(x)`` (for 2 classes, the sign of ``f_1 - f_0``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["gaussian_mixture", "teacher_student"]

_Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _num_train(dim: int, num_train: int | None, alpha: float | None) -> int:
    if num_train is not None and alpha is not None:
        raise ValueError(
            f"give either num_train ({num_train}) or alpha ({alpha}) = num_train / dim, not both"
        )
    if alpha is not None:
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        return max(1, round(alpha * dim))
    return _check_positive_int("num_train", 1000 if num_train is None else num_train)


def gaussian_mixture(
    *,
    dim: int = 100,
    num_train: int | None = None,
    alpha: float | None = None,
    num_test: int = 10000,
    delta: float = 1.0,
    rho: float = 0.5,
    seed: int = 0,
) -> _Split:
    """Sample the two-cluster Gaussian mixture ``x = y v / sqrt(N) + sqrt(Delta) z``.

    Args:
        dim: input dimension ``N``.
        num_train: training samples ``P`` (default 1000 unless ``alpha`` is given).
        alpha: sample ratio ``P / N`` (alternative to ``num_train``).
        num_test: test samples.
        delta: noise variance ``Delta`` > 0.
        rho: probability of ``y = +1``, in ``(0, 1)``.
        seed: seed of the private generator (same seed, same data).

    Returns:
        ``(x_train, y_train, x_test, y_test, info)`` with float32 ``x`` of shape ``[., N]``, int64
        labels in ``{0, 1}`` and ``info = {"v": v, ...}`` (the centre ``v``, float32 ``[N]``).

    Raises:
        ValueError: a non-positive size, ``delta <= 0`` or ``rho`` outside ``(0, 1)``.
    """
    dim = _check_positive_int("dim", dim)
    p = _num_train(dim, num_train, alpha)
    num_test = _check_positive_int("num_test", num_test)
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 0):
        raise ValueError(f"delta (noise variance Delta) must be a positive number, got {delta!r}")
    if not (isinstance(rho, (int, float)) and 0.0 < rho < 1.0):
        raise ValueError(f"rho (P[y=+1]) must lie in (0, 1), got {rho!r}")
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, generator=g)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        cls = (torch.rand(n, generator=g) < rho).to(torch.int64)
        sign = (2 * cls - 1).to(torch.float32)
        z = torch.randn(n, dim, generator=g)
        x = sign[:, None] * v[None, :] / math.sqrt(dim) + math.sqrt(delta) * z
        return x, cls

    x_train, y_train = sample(p)
    x_test, y_test = sample(num_test)
    info = {"v": v, "dim": dim, "alpha": p / dim, "delta": float(delta), "rho": float(rho)}
    return x_train, y_train, x_test, y_test, info


def teacher_student(
    *,
    dim: int = 100,
    num_train: int | None = None,
    alpha: float | None = None,
    num_test: int = 10000,
    hidden: Sequence[int] = (32,),
    num_classes: int = 2,
    activation: str = "relu",
    seed: int = 0,
) -> _Split:
    """Label Gaussian inputs ``x ~ N(0, I_D)`` with a random teacher MLP.

    Args:
        dim: input dimension ``D``.
        num_train: training samples (default 1000 unless ``alpha`` is given).
        alpha: ``num_train / dim`` (alternative to ``num_train``).
        num_test: test samples.
        hidden: hidden widths of the teacher (empty for a linear teacher).
        num_classes: number of classes ``K >= 2``; the label is ``argmax_k f_k(x)``.
        activation: ``"relu"``, ``"tanh"`` or ``"sign"``.
        seed: seed of the private generator.

    Returns:
        ``(x_train, y_train, x_test, y_test, info)``; ``info["teacher"]`` is the list of weight
        matrices ``W_l`` (shape ``[out, in]``) so the labels can be recomputed.

    Raises:
        ValueError: bad sizes, ``num_classes < 2`` or an unknown activation.
    """
    acts = {"relu": torch.relu, "tanh": torch.tanh, "sign": torch.sign}
    if activation not in acts:
        raise ValueError(f"unknown activation {activation!r} (valid: {sorted(acts)})")
    dim = _check_positive_int("dim", dim)
    p = _num_train(dim, num_train, alpha)
    num_test = _check_positive_int("num_test", num_test)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    widths = [_check_positive_int("hidden width", h) for h in hidden]
    g = torch.Generator().manual_seed(seed)
    sizes = [dim, *widths, num_classes]
    weights = [torch.randn(o, i, generator=g) / math.sqrt(i) for i, o in zip(sizes, sizes[1:])]
    phi = acts[activation]

    def label(x: torch.Tensor) -> torch.Tensor:
        h = x
        for w in weights[:-1]:
            h = phi(h @ w.T)
        return (h @ weights[-1].T).argmax(dim=1)

    x_train = torch.randn(p, dim, generator=g)
    x_test = torch.randn(num_test, dim, generator=g)
    info = {"teacher": weights, "activation": activation, "dim": dim}
    return x_train, label(x_train), x_test, label(x_test), info
