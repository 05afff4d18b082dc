"""Vectorised SGD / Replicated-SGD / Entropy-SGD for the linear classifier (a grid at once).

The updates of :class:`flatminima.optim.ReplicatedSGD` and :class:`flatminima.optim.EntropySGD`
(built-in torch-SGD outer step), specialised to the linear model ``sign(u . x)``
(``u = w / sqrt(N)``; with ``fit_intercept``, ``sign(u . x + b)``) and run in numpy for a
whole hyperparameter grid of ``K`` configurations and ``y`` replicas in one ``[y, K, N]``
array, so that a grid costs a few batched matrix products per step. The ``K`` configurations
share the initialisation, the minibatches and the Langevin draws (common random numbers).
``tests/test_gmm_fastdyn.py`` runs :class:`GridDynamics` and the library optimizers side by
side on the same linear model, the same minibatches and the same noise draws, and checks every
weight after every step (float64, ``max |dw| <= 1e-10``).

Objectives per minibatch ``B`` (signed inputs ``y_mu x_mu``, margins ``h_mu = y_mu u . x_mu``):

- ``"logistic"``: ``E(u; B) = mean_{mu in B} log(1 + exp(-h_mu))``.
- ``"error"`` (error-counting classifier, norm independent):
  ``E(u; B) = mean_mu sigmoid(-h_mu / (||u|| T_t))`` with the temperature sharpened as
  ``T_t = T0 (T1 / T0)^(t / t_max)``; its gradient
  ``mean_mu s'_mu (-1 / T_t) (y_mu x_mu / ||u|| - h_mu u / ||u||^3)`` is tangential. The
  trained weights (each rSGD replica, the eSGD outer variable ``x``) are projected back onto
  the unit sphere after every (outer) step; the eSGD walker ``w'`` is not projected (the
  library's inner loop has no hook for it).

Algorithms (Pittorino et al., ICLR 2021, arXiv:2006.07897, Sec. 3-4; Chaudhari et al., ICLR
2017, arXiv:1611.01838), exactly as the library computes them:

- ``"sgd"``: ``"rsgd"`` with one replica (the coupling vanishes).
- ``"rsgd"``: ``y`` replicas, replica ``a`` on its own minibatch stream, ``c = mean_a u_a``
  (before the step), ``G_a = grad E(u_a; B_a) + gamma_t (u_a - c)``, then one torch-SGD step
  ``buf_a <- m buf_a + G_a``, ``u_a <- u_a - eta buf_a`` (Nesterov: ``- eta (G_a + m buf_a)``;
  ``m = 0``: ``- eta G_a``). ``gamma_t = gamma`` (finite coupling; ``gamma = 0`` is the
  control "average of y uncoupled runs") or, ``scoped``,
  ``gamma_t = gamma (gamma_growth)^(t / t_max)``. The estimator is ``c``.
- ``"esgd"``: per outer step, ``delta = 0`` and ``mu - x = 0``, then ``L`` Langevin steps on
  ``w' = x + delta``: ``delta <- (1 - eta' gamma) delta - eta' grad E(w'; B) +
  sqrt(2 eta') eps xi`` (``xi ~ N(0, I)``), ``(mu - x) <- alpha (mu - x) + (1 - alpha) delta``;
  then ``G = s (x - mu)`` with ``s = gamma`` (``scale_by_gamma``) or 1, and one torch-SGD step
  on ``x`` with ``G``, learning rate ``outer_lr`` and momentum ``m``. With ``outer_lr = 1``,
  ``s = 1``, ``m = 0`` this is ``x <- mu``. The estimator is ``x``. ``xi`` is drawn as
  EntropySGD draws it: one ``N``-vector per inner step from a ``torch.Generator`` seeded with
  ``seed`` (so ``EntropySGD(..., seed=seed)`` sees the same noise).

Named deviation (off by default): ``max_lr_gamma`` caps the coupling at
``gamma_t <= max_lr_gamma / eta`` (``eta`` the step the coupling multiplies: rSGD's ``lr``,
eSGD's inner ``lr``), i.e. at most a full move onto the centre / anchor per step when
``max_lr_gamma = 1``. It is the library's update with the capped ``gamma_t`` written into the
param group, and keeps the scoped schedule (``gamma_t`` grown x1000) stable. The study uses it
for the scoped rSGD variants only.

Budget: counted in gradient evaluations (samples through a gradient), all replicas / inner
steps together: ``epochs`` passes over the ``P`` samples for every algorithm.
Step sizes ``lr`` are in units of ``B / (N Delta_hat)`` (``Delta_hat = mean ||x||^2 / N`` from
the training data), the stability scale of a minibatch of ``B`` samples; ``outer_lr`` is
absolute.

Example:
    >>> from flatminima.gmm.data import sample
    >>> X, y, v = sample(50, 2.0, 1.0, seed=0)
    >>> run = run_grid(X, y, "rsgd", "logistic", [dict(lr=0.5, gamma=0.3)], epochs=3,
    ...                num_replicas=3, n_evals=2)
    >>> run.w.shape, bool(run.diverged[0])
    ((2, 1, 50), False)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

__all__ = [
    "GridRun",
    "GridDynamics",
    "run_grid",
    "initial_weights",
    "minibatch_stream",
    "ALGORITHMS",
    "OBJECTIVES",
]

log = logging.getLogger(__name__)

ALGORITHMS = ("sgd", "rsgd", "esgd")
OBJECTIVES = ("logistic", "error")
#: grid keys and their defaults
GRID_DEFAULTS = {
    "lr": None,
    "gamma": 0.0,
    "gamma_growth": 1e3,
    "temp1": 0.05,
    "noise": 1e-2,
    "momentum": 0.0,
    "outer_lr": 1.0,
}


@dataclass
class GridRun:
    """Checkpoints of the estimator for every configuration of a grid.

    Attributes:
        epochs: ``[C]`` gradient evaluations / P at each checkpoint.
        w: ``[C, K, N]`` estimator ``w = sqrt(N) u`` (configuration ``k`` at checkpoint ``c``);
            non-finite where a configuration diverged.
        grad_evals: total gradient evaluations of one configuration (all replicas).
        diverged: ``[K]`` True where a configuration's weights became non-finite.
        b: ``[C, K]`` bias of the estimator (zeros without ``fit_intercept``).
    """

    epochs: np.ndarray
    w: np.ndarray
    grad_evals: int
    diverged: np.ndarray
    b: np.ndarray


def _check_value(key: str, val: object) -> None:
    """Range check of one grid value (``ValueError`` naming it)."""
    ok = isinstance(val, int | float) and not isinstance(val, bool) and math.isfinite(val)
    positive = ("lr", "gamma_growth", "temp0", "temp1", "outer_lr")
    if key in positive:
        ok = ok and val > 0  # type: ignore[operator]
    else:
        ok = ok and val >= 0  # type: ignore[operator]
    if not ok:
        raise ValueError(
            f"Invalid {key} value: {val!r} (expected a finite number "
            f"{'> 0' if key in positive else '>= 0'})"
        )


def _check(
    algorithm: str,
    objective: str,
    grid: Sequence[dict[str, float]],
    ints: dict[str, int],
    epochs: float,
    mu_decay: float,
    max_lr_gamma: float | None,
) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"Invalid algorithm: {algorithm!r} (valid: {ALGORITHMS})")
    if objective not in OBJECTIVES:
        raise ValueError(f"Invalid objective: {objective!r} (valid: {OBJECTIVES})")
    if not grid:
        raise ValueError("Invalid grid: [] (expected at least one configuration)")
    for g in grid:
        bad = set(g) - set(GRID_DEFAULTS)
        if bad:
            raise ValueError(f"Invalid grid keys: {sorted(bad)} (valid: {sorted(GRID_DEFAULTS)})")
        _check_value("lr", g.get("lr"))
        for key, val in g.items():
            _check_value(key, val)
    if not (isinstance(epochs, int | float) and math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"Invalid epochs value: {epochs!r} (expected > 0)")
    if not (isinstance(mu_decay, int | float) and 0 <= mu_decay < 1):
        raise ValueError(f"Invalid mu_decay value: {mu_decay!r} (expected 0 <= mu_decay < 1)")
    if max_lr_gamma is not None and not (math.isfinite(max_lr_gamma) and max_lr_gamma > 0):
        raise ValueError(f"Invalid max_lr_gamma value: {max_lr_gamma!r} (expected None or > 0)")
    for name, val in ints.items():
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"Invalid {name} value: {val!r} (expected an int >= 1)")


def initial_weights(n: int, num_replicas: int, seed: int, sphere: bool = False) -> np.ndarray:
    """Initial ``u ~ N(0, I / N)``, independent per replica: ``[num_replicas, n]``.

    Drawn from ``numpy.random.default_rng([seed, 12])``; ``sphere`` projects each onto
    ``||u|| = 1``.
    """
    u = np.random.default_rng([seed, 12]).standard_normal((num_replicas, n)) / math.sqrt(n)
    if sphere:
        u /= np.linalg.norm(u, axis=-1, keepdims=True)
    return u


def minibatch_stream(p: int, bsz: int, seed: int, stream: int) -> Iterator[np.ndarray]:
    """Minibatch indices of one stream: passes over a fresh permutation of ``range(p)``, each
    split into ``ceil(p / bsz)`` near-equal batches (``numpy.random.default_rng([seed, 11,
    stream])``). rSGD replica ``a`` reads stream ``a``; eSGD reads stream 0."""
    rng = np.random.default_rng([seed, 11, stream])
    while True:
        yield from np.array_split(rng.permutation(p), math.ceil(p / bsz))


class _Normal:
    """Standard-normal ``N``-vectors drawn exactly as EntropySGD draws its Langevin noise."""

    def __init__(self, n: int, seed: int) -> None:
        import torch

        self._gen = torch.Generator().manual_seed(seed)
        self._buf = torch.empty(n, dtype=torch.float64)

    def __call__(self) -> np.ndarray:
        return self._buf.normal_(generator=self._gen).numpy().copy()


def objective_grad(objective: str, v: np.ndarray, xb: np.ndarray, temp: np.ndarray) -> np.ndarray:
    """Gradient of the minibatch objective at ``v [K, N]`` on signed inputs ``xb [B, N]``.

    ``temp [K]`` is used by ``"error"`` only (see the module docstring for both formulas).
    """
    h = v @ xb.T  # [K, B]
    if objective == "logistic":
        return (-expit(-h) / xb.shape[0]) @ xb
    r = np.linalg.norm(v, axis=-1, keepdims=True)  # [K, 1]
    s = expit(-h / (r * temp[:, None]))
    g = -s * (1 - s) / (temp[:, None] * xb.shape[0])  # dE/dz * dz/dh at ||v|| = 1
    return (g @ xb) / r - (g * h).sum(1, keepdims=True) * v / r**3


def _sgd_update_(
    w: np.ndarray,
    grad: np.ndarray,
    buf: np.ndarray | None,
    lr: np.ndarray,
    mom: np.ndarray,
    nesterov: bool,
) -> None:
    """torch.optim.SGD (dampening 0) in place: ``buf <- m buf + G``; ``w -= lr buf`` (or
    ``lr (G + m buf)``); ``buf is None``: no momentum, ``w -= lr G``. ``lr, mom`` are ``[K]``
    broadcast over the last axis."""
    if buf is None:
        w -= lr[:, None] * grad
        return
    buf *= mom[:, None]
    buf += grad
    update = grad + mom[:, None] * buf if nesterov else buf
    w -= lr[:, None] * update


class GridDynamics:
    """The state of a grid run, advanced one (outer) step at a time by :meth:`step`.

    Args:
        X: Inputs ``[P, N]``.
        y: Labels ``[P]`` in {-1, +1}.
        algorithm: ``"sgd"``, ``"rsgd"`` or ``"esgd"``.
        objective: ``"logistic"`` or ``"error"``.
        grid: ``K`` dicts with ``lr`` and as needed ``gamma`` (default 0), ``gamma_growth``
            (scoped: final / initial coupling, default 1e3), ``temp1`` (final temperature of
            the ``"error"`` objective, default 0.05), ``noise`` (eSGD's ``eps``, default 1e-2),
            ``momentum`` (default 0), ``outer_lr`` (eSGD, default 1).
        epochs: Budget in gradient evaluations / P, all replicas (inner steps) together.
        num_replicas: ``y`` for ``rsgd`` (ignored otherwise).
        scoped: ``rsgd`` with ``gamma_t`` grown geometrically by ``gamma_growth``.
        steps_per_epoch: Minibatch size ``B = ceil(P / steps_per_epoch)``.
        inner_steps: ``L`` of ``esgd``.
        mu_decay: ``esgd``'s averaging factor ``alpha``.
        temp0: Initial temperature of the ``"error"`` objective.
        nesterov: Nesterov momentum (where ``momentum > 0``).
        scale_by_gamma: ``esgd`` outer gradient ``gamma (x - mu)`` instead of ``x - mu``.
        max_lr_gamma: None (off: the library's update) or the cap of ``eta gamma_t``.
        fit_intercept: Train a bias ``b`` too: the model is ``sign(u . x + b)``, i.e.
            ``torch.nn.Linear(N, 1, bias=True)``; ``b`` is the last coordinate of ``u``
            (``u[..., N]``, initialised at 0), coupled, noised and (``"error"``: jointly with
            the weights) projected like every other parameter, as the library treats a bias.
        seed: Seeds the initialisation, the minibatch streams and the Langevin noise.

    Attributes:
        u: ``[y, K, N]`` current weights (the eSGD outer variable ``x`` in ``u[0]``);
            ``[y, K, N + 1]`` with the bias last when ``fit_intercept``.
        t: Steps taken; ``total_steps``: the budget in steps.
        last_batches: Minibatch index arrays used by the last step, in the order they were
            used (rSGD: one per replica; eSGD: one per inner step).

    Raises:
        ValueError: on a bad argument (named in the message).

    Example:
        >>> from flatminima.gmm.data import sample
        >>> X, y, _ = sample(20, 2.0, 1.0, seed=0)
        >>> dyn = GridDynamics(X, y, "esgd", "logistic", [dict(lr=0.5, gamma=0.3)], epochs=2)
        >>> dyn.step()
        >>> dyn.u.shape, len(dyn.last_batches), dyn.total_steps
        ((1, 1, 20), 5, 8)
    """

    def __init__(
        self,
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
        nesterov: bool = False,
        scale_by_gamma: bool = False,
        max_lr_gamma: float | None = None,
        fit_intercept: bool = False,
        seed: int = 0,
    ) -> None:
        ints = dict(
            num_replicas=num_replicas, steps_per_epoch=steps_per_epoch, inner_steps=inner_steps
        )
        _check(algorithm, objective, grid, ints, epochs, mu_decay, max_lr_gamma)
        _check_value("temp0", temp0)
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if X.ndim != 2 or y.shape != (X.shape[0],) or X.shape[0] == 0:
            raise ValueError(f"Invalid shapes: X {X.shape}, y {y.shape}")
        p, n = X.shape
        self.algorithm, self.objective, self.scoped = algorithm, objective, scoped
        self.inner_steps, self.mu_decay, self.temp0 = inner_steps, mu_decay, temp0
        self.nesterov, self.scale_by_gamma = nesterov, scale_by_gamma
        self.max_lr_gamma = max_lr_gamma
        self.fit_intercept = bool(fit_intercept)
        Xa = np.hstack([X, np.ones((p, 1))]) if fit_intercept else X
        self.Xy = Xa * y[:, None]  # signed inputs: margins h = Xy @ u
        self.bsz = math.ceil(p / steps_per_epoch)
        self.unit = self.bsz / (float(np.einsum("ij,ij->", X, X)) / p)  # B / (N Delta_hat)
        self.hp = {
            k: np.array([g.get(k, d) for g in grid], dtype=np.float64)
            for k, d in GRID_DEFAULTS.items()
        }
        self.lr = self.hp["lr"] * self.unit  # [K]
        reps = num_replicas if algorithm == "rsgd" else 1
        self.sphere = objective == "error"
        k = len(grid)
        u0 = initial_weights(n, reps, seed, self.sphere)
        if fit_intercept:
            u0 = np.hstack([u0, np.zeros((reps, 1))])
        self.u = np.repeat(u0[:, None], k, axis=1)
        self.buf = np.zeros_like(self.u) if np.any(self.hp["momentum"] > 0) else None
        self.streams = [minibatch_stream(p, self.bsz, seed, a) for a in range(reps)]
        self._normal = _Normal(self.u.shape[-1], seed) if algorithm == "esgd" else None
        self.evals_per_step = (inner_steps if algorithm == "esgd" else reps) * self.bsz
        self.total_steps = max(1, round(epochs * p / self.evals_per_step))
        self.t = 0
        self.last_batches: list[np.ndarray] = []

    def schedule(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """``(T_t, gamma_t)``, both ``[K]``, at (1-based) step ``t`` (``max_lr_gamma`` applied)."""
        frac = (t - 1) / max(1, self.total_steps - 1)
        temp = self.temp0 * (self.hp["temp1"] / self.temp0) ** frac
        gamma = self.hp["gamma"]
        if self.scoped:
            gamma = gamma * self.hp["gamma_growth"] ** frac
        if self.max_lr_gamma is not None:
            gamma = np.minimum(gamma, self.max_lr_gamma / self.lr)
        return temp, gamma

    def _batch(self, stream: int) -> np.ndarray:
        idx = next(self.streams[stream])
        self.last_batches.append(idx)
        return self.Xy[idx]

    def _grad(self, v: np.ndarray, xb: np.ndarray, temp: np.ndarray) -> np.ndarray:
        return objective_grad(self.objective, v, xb, temp)

    def step(self) -> None:
        """One step of the algorithm (eSGD: one outer step of ``L`` inner steps)."""
        self.t += 1
        self.last_batches = []
        temp, gamma = self.schedule(self.t)
        with np.errstate(all="ignore"):  # a diverging configuration is reported, not warned
            if self.algorithm == "esgd":
                self._esgd_step(temp, gamma)
            else:
                self._rsgd_step(temp, gamma)

    def _rsgd_step(self, temp: np.ndarray, gamma: np.ndarray) -> None:
        u, reps = self.u, self.u.shape[0]
        total = u.sum(0)  # [K, N]; the centre is total / y
        grads = np.stack([self._grad(u[a], self._batch(a), temp) for a in range(reps)])
        if reps > 1:  # G_a += gamma (u_a - c), as flatminima.optim._common.add_coupling_
            grads += gamma[:, None] * u
            grads -= (gamma / reps)[:, None] * total
        _sgd_update_(u, grads, self.buf, self.lr, self.hp["momentum"], self.nesterov)
        if self.sphere:
            _project_(u)

    def _esgd_step(self, temp: np.ndarray, gamma: np.ndarray) -> None:
        x, eta = self.u[0], self.lr
        delta = np.zeros_like(x)
        mo = np.zeros_like(x)  # mu - x
        noise = (np.sqrt(2.0 * eta) * self.hp["noise"])[:, None]
        weight = 1.0 - self.mu_decay  # (mu - x) <- lerp((mu - x), delta, weight), as torch.lerp
        for _ in range(self.inner_steps):
            g = self._grad(x + delta, self._batch(0), temp)
            delta *= (1.0 - eta * gamma)[:, None]
            delta -= eta[:, None] * g
            if self._normal is not None and np.any(noise > 0):
                delta += noise * self._normal()
            if weight < 0.5:  # torch.lerp's two formulas
                mo += weight * (delta - mo)
            else:
                mo[...] = delta - (delta - mo) * self.mu_decay
        scale = gamma[:, None] if self.scale_by_gamma else 1.0
        grad = -scale * mo  # G = s (x - mu)
        buf = None if self.buf is None else self.buf[0]
        _sgd_update_(x, grad, buf, self.hp["outer_lr"], self.hp["momentum"], self.nesterov)
        if self.sphere:
            _project_(x)

    def estimator(self) -> tuple[np.ndarray, np.ndarray]:
        """``(w [K, N], b [K])``: ``w = sqrt(N) c`` of the centre ``c`` (eSGD: ``x``) and its
        bias (zeros without ``fit_intercept``)."""
        with np.errstate(all="ignore"):  # non-finite where a configuration diverged
            c = self.u.mean(0)
            n = c.shape[-1] - int(self.fit_intercept)
            b = c[:, n].copy() if self.fit_intercept else np.zeros(c.shape[0])
            return c[:, :n] * math.sqrt(n), b


def _project_(v: np.ndarray) -> None:
    v /= np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-300)


def run_grid(
    X: np.ndarray,
    y: np.ndarray,
    algorithm: str,
    objective: str,
    grid: Sequence[dict[str, float]],
    *,
    n_evals: int = 30,
    **kwargs: object,
) -> GridRun:
    """Train the linear classifier for every configuration of ``grid`` at once.

    Args:
        X, y, algorithm, objective, grid: as :class:`GridDynamics`.
        n_evals: Number of checkpoints (evenly spaced in steps, the last at the end).
        **kwargs: the keyword arguments of :class:`GridDynamics` (``epochs``,
            ``num_replicas``, ``scoped``, ``steps_per_epoch``, ``inner_steps``, ``mu_decay``,
            ``temp0``, ``nesterov``, ``scale_by_gamma``, ``max_lr_gamma``,
            ``fit_intercept``, ``seed``).

    Returns:
        A :class:`GridRun`.

    Raises:
        ValueError: on a bad argument (named in the message).
    """
    if isinstance(n_evals, bool) or not isinstance(n_evals, int) or n_evals < 1:
        raise ValueError(f"Invalid n_evals value: {n_evals!r} (expected an int >= 1)")
    dyn = GridDynamics(X, y, algorithm, objective, grid, **kwargs)  # type: ignore[arg-type]
    total = dyn.total_steps
    at = set(np.unique(np.linspace(1, total, n_evals).round().astype(int)).tolist())
    ck_ep, ck_w, ck_b = [], [], []
    for t in range(1, total + 1):
        dyn.step()
        if t in at:
            ck_ep.append(t * dyn.evals_per_step / X.shape[0])
            w, b = dyn.estimator()
            ck_w.append(w)
            ck_b.append(b)
    diverged = ~np.isfinite(dyn.u).all(axis=(0, 2))
    if diverged.any():
        log.info(
            "%s/%s: %d of %d configurations diverged: %s",
            algorithm,
            objective,
            int(diverged.sum()),
            len(grid),
            [dict(g) for g, d in zip(grid, diverged) if d],
        )
    evals = int(total * dyn.evals_per_step)
    return GridRun(np.asarray(ck_ep), np.stack(ck_w), evals, diverged, np.stack(ck_b))
