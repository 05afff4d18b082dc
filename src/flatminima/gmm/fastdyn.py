"""Vectorised SGD / Replicated-SGD / Entropy-SGD for the linear classifier (a grid at once).

A private, dependency-free (numpy) implementation of the updates of
:class:`flatminima.optim.ReplicatedSGD` and :class:`flatminima.optim.EntropySGD` specialised to
the linear model ``sign(u . x)`` (``u = w / sqrt(N)``), run for a whole hyperparameter grid of
``K`` configurations and ``y`` replicas in one ``[y, K, N]`` array, so that a grid costs a few
batched matrix products per step. ``tests/test_gmm_dynamics.py`` checks it against the
``flatminima.optim`` implementation step by step (:func:`flatminima.gmm.dynamics.train_linear`).

Objectives per minibatch ``B`` (as in :mod:`flatminima.gmm.dynamics`):

- ``"logistic"``: ``E(u; B) = mean_{mu in B} log(1 + exp(-y_mu u . x_mu))``.
- ``"error"`` (error-counting classifier, norm independent): ``u`` on the unit sphere
  (projected back after every step), ``E(u; B) = mean sigmoid(-y_mu u . x_mu / (||u|| T_t))``
  with the temperature sharpened as ``T_t = T0 (T1 / T0)^(t / t_max)``; the gradient is the
  tangential one, ``(I - u u^T) grad``.

Algorithms (Pittorino et al., ICLR 2021, arXiv:2006.07897, Sec. 3-4; Chaudhari et al., ICLR
2017, arXiv:1611.01838):

- ``"sgd"``: ``u <- u - eta grad E(u; B_t)``.
- ``"rsgd"``: ``y`` replicas, each on its own minibatch stream, ``c = mean_a u_a``,
  ``u_a <- u_a - eta (grad E(u_a; B_a) + gamma_t (u_a - c))``; the estimator is ``c``.
  ``gamma_t = gamma`` (finite coupling, held fixed; ``gamma = 0`` is the control "average of
  y uncoupled runs") or, ``scoped``, ``gamma_t = gamma (gamma_growth)^(t / t_max)``.
- ``"esgd"``: outer ``x``; each outer step resets ``x' = mu = x`` and runs ``L`` Langevin steps
  ``x' <- x' - eta (grad E(x'; B) + gamma (x' - x)) + sqrt(eta) noise xi``,
  ``mu <- mu_decay mu + (1 - mu_decay) x'``, then ``x <- mu`` (``EntropySGD`` with outer
  ``lr = 1``, ``scale_by_gamma=False``); the estimator is ``x``.

The coupling step ``eta gamma_t`` is clipped at 1 (at most a full move onto the centre /
anchor), which keeps the scoped schedule stable when ``gamma_t`` grows large; the coupling
is applied right after the gradient step (operator splitting: equal to the
``flatminima.optim`` update to first order in ``eta``, exactly equal when ``gamma = 0`` or
``y = 1``).

Budget: counted in gradient evaluations (samples through a gradient), all replicas / inner
steps together: ``epochs`` passes over the ``P`` samples for every algorithm.
Step sizes are in units of ``B / (N Delta_hat)`` (``Delta_hat = mean ||x||^2 / N`` from the
training data), the stability scale of a minibatch of ``B`` samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

__all__ = ["GridRun", "run_grid", "ALGORITHMS", "OBJECTIVES"]

ALGORITHMS = ("sgd", "rsgd", "esgd")
OBJECTIVES = ("logistic", "error")
_KEYS = {"lr", "gamma", "gamma_growth", "temp1", "noise"}


@dataclass
class GridRun:
    """Checkpoints of the estimator for every configuration of a grid.

    Attributes:
        epochs: ``[C]`` gradient evaluations / P at each checkpoint.
        w: ``[C, K, N]`` estimator ``w = sqrt(N) u`` (configuration ``k`` at checkpoint ``c``).
        grad_evals: total gradient evaluations of one configuration (all replicas).
    """

    epochs: np.ndarray
    w: np.ndarray
    grad_evals: int


def _check(
    algorithm: str,
    objective: str,
    grid: Sequence[dict[str, float]],
    epochs: float,
    num_replicas: int,
    steps_per_epoch: int,
    inner_steps: int,
    n_evals: int,
) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"Invalid algorithm: {algorithm!r} (valid: {ALGORITHMS})")
    if objective not in OBJECTIVES:
        raise ValueError(f"Invalid objective: {objective!r} (valid: {OBJECTIVES})")
    if not grid:
        raise ValueError("Invalid grid: [] (expected at least one configuration)")
    for g in grid:
        bad = set(g) - _KEYS
        if bad:
            raise ValueError(f"Invalid grid keys: {sorted(bad)} (valid: {sorted(_KEYS)})")
        if not g.get("lr", 0) > 0:
            raise ValueError(f"Invalid lr value: {g.get('lr')!r} (expected > 0)")
        for k in ("gamma", "noise"):
            if not g.get(k, 0.0) >= 0:
                raise ValueError(f"Invalid {k} value: {g[k]!r} (expected >= 0)")
    if not (math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"Invalid epochs value: {epochs!r} (expected > 0)")
    for name, val in (
        ("num_replicas", num_replicas),
        ("steps_per_epoch", steps_per_epoch),
        ("inner_steps", inner_steps),
        ("n_evals", n_evals),
    ):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"Invalid {name} value: {val!r} (expected an int >= 1)")


def run_grid(
    X: np.ndarray,
    y: np.ndarray,
    algorithm: str,
    objective: str,
    grid: Sequence[dict[str, float]],
    *,
    epochs: float = 60.0,
    num_replicas: int = 3,
    scoped: bool = False,
    steps_per_epoch: int = 20,
    inner_steps: int = 5,
    mu_decay: float = 0.75,
    temp0: float = 1.0,
    n_evals: int = 30,
    seed: int = 0,
) -> GridRun:
    """Train the linear classifier for every configuration of ``grid`` at once.

    Args:
        X: Inputs ``[P, N]``.
        y: Labels ``[P]`` in {-1, +1}.
        algorithm: ``"sgd"``, ``"rsgd"`` or ``"esgd"``.
        objective: ``"logistic"`` or ``"error"``.
        grid: ``K`` dicts with ``lr`` and as needed ``gamma`` (default 0), ``gamma_growth``
            (scoped: final / initial coupling, default 1e3), ``temp1`` (final temperature of
            the ``"error"`` objective, default 0.05), ``noise`` (``esgd``, default 1e-2).
        epochs: Budget in gradient evaluations / P, all replicas (inner steps) together.
        num_replicas: ``y`` for ``rsgd`` (ignored otherwise).
        scoped: ``rsgd`` with ``gamma_t`` grown geometrically by ``gamma_growth``.
        steps_per_epoch: Minibatch size ``B = ceil(P / steps_per_epoch)``.
        inner_steps: ``L`` of ``esgd``.
        mu_decay: ``esgd`` running-average factor.
        temp0: Initial temperature of the ``"error"`` objective.
        n_evals: Number of checkpoints (evenly spaced in steps).
        seed: Seeds the initialisations (shared by the ``K`` configurations, independent across
            replicas), minibatch order and Langevin noise.

    Returns:
        A :class:`GridRun`.

    Raises:
        ValueError: on a bad argument (named in the message).
    """
    _check(algorithm, objective, grid, epochs, num_replicas, steps_per_epoch, inner_steps, n_evals)
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"Invalid shapes: X {X.shape}, y {y.shape}")
    p, n = X.shape
    k = len(grid)
    rng = np.random.default_rng([seed, 11])
    bsz = math.ceil(p / steps_per_epoch)
    delta_hat = float(np.einsum("ij,ij->", X, X)) / (p * n)
    unit = bsz / (n * delta_hat)
    lr = np.array([g["lr"] for g in grid]) * unit  # [K]
    gam0 = np.array([g.get("gamma", 0.0) for g in grid])
    growth = np.array([g.get("gamma_growth", 1e3) for g in grid])
    temp1 = np.array([g.get("temp1", 0.05) for g in grid])
    noise = np.array([g.get("noise", 1e-2) for g in grid])
    reps = num_replicas if algorithm == "rsgd" else 1
    sphere = objective == "error"
    Xy = X * y[:, None]  # margins h = (y x) . u

    u = np.broadcast_to(rng.standard_normal((reps, 1, n)) / math.sqrt(n), (reps, k, n)).copy()
    if sphere:
        u /= np.linalg.norm(u, axis=-1, keepdims=True)
    queues: list[list[np.ndarray]] = [[] for _ in range(reps)]

    def batch(a: int) -> np.ndarray:
        if not queues[a]:
            queues[a].extend(np.array_split(rng.permutation(p), math.ceil(p / bsz)))
        return Xy[queues[a].pop()]

    def grad(v: np.ndarray, xb: np.ndarray, temp: np.ndarray) -> np.ndarray:
        """Gradient of the minibatch objective at ``v [K, N]`` on signed inputs ``xb [B, N]``."""
        h = v @ xb.T  # [K, B]
        if objective == "logistic":
            g = -expit(-h) / xb.shape[0]
            return g @ xb
        s = expit(-h / temp[:, None])
        g = -s * (1 - s) / (temp[:, None] * xb.shape[0])  # dE/dh with ||v|| = 1
        return g @ xb - (g * h).sum(1, keepdims=True) * v  # tangential part

    evals_per_step = (inner_steps if algorithm == "esgd" else reps) * bsz
    total = max(1, round(epochs * p / evals_per_step))
    at = set(np.unique(np.linspace(1, total, n_evals).round().astype(int)).tolist())
    ck_ep, ck_w = [], []

    def project(v: np.ndarray) -> None:
        v /= np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-300)

    for t in range(1, total + 1):
        frac = (t - 1) / max(1, total - 1)
        temp = temp0 * (temp1 / temp0) ** frac
        if algorithm == "esgd":
            x = u[0]
            xp, mu = x.copy(), x.copy()
            for _ in range(inner_steps):
                xp -= lr[:, None] * grad(xp, batch(0), temp)
                xp -= np.minimum(lr * gam0, 1.0)[:, None] * (xp - x)
                xp += (np.sqrt(lr) * noise)[:, None] * rng.standard_normal(xp.shape)
                if sphere:
                    project(xp)
                mu = mu_decay * mu + (1 - mu_decay) * xp
            u[0] = mu
            if sphere:
                project(u[0])
        else:
            gam = gam0 * growth**frac if scoped else gam0
            c = u.mean(0)
            for a in range(reps):
                u[a] -= lr[:, None] * grad(u[a], batch(a), temp)
                if reps > 1:
                    u[a] -= np.minimum(lr * gam, 1.0)[:, None] * (u[a] - c)
            if sphere:
                project(u)
        if t in at:
            ck_ep.append(t * evals_per_step / p)
            ck_w.append(u.mean(0) * math.sqrt(n))
    return GridRun(np.asarray(ck_ep), np.stack(ck_w), int(total * evals_per_step))
