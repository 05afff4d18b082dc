"""SGD, Replicated-SGD and Entropy-SGD for the linear classifier on the Gaussian mixture.

The model is ``u`` with ``sign(u . x + b)``, i.e. ``u = w / sqrt(N)`` in the notation of
:mod:`flatminima.gmm.theory` (``||u|| ~ 1``). Two objectives per minibatch ``B``:

- ``"logistic"`` (a differentiable loss): ``E(u; B) = mean_{mu in B} log(1 + exp(-y_mu u . x_mu))``.
- ``"error"`` (the error-counting classifier, norm independent): the weights live on the unit
  sphere (each replica / the Entropy-SGD centre is projected back after every step) and the step
  ``Theta(-y h)`` is smoothed as ``E(u; B) = mean sigmoid(-y_mu u . x_mu / (||u|| T_t))``,
  sharpened during training by ``T_t = T0 (T1 / T0)^(t / t_max)``.

Algorithms (all from :mod:`flatminima.optim`; budgets counted in gradient evaluations, i.e.
samples through backward, as in docs/design.md, "Budget units"):

- ``sgd``: ``Replicas`` with y = 1 and ``ReplicatedSGD`` (exactly ``torch.optim.SGD``).
- ``rsgd``: y replicas from independent initialisations, coupling ``gamma`` held fixed (finite
  coupling: the local-entropy maximiser at a finite distance, not the collapsed point); the
  estimator is the centre ``c = mean_a u_a``. ``gamma = 0`` is the control "average of y
  uncoupled runs".
- ``esgd``: ``EntropySGD`` with ``L`` inner Langevin steps at temperature ``noise``; the
  estimator is its outer variable ``x``.

Pittorino et al., ICLR 2021 (arXiv:2006.07897), Sec. 3-4.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from flatminima.optim import EntropySGD, Replicas, ReplicatedSGD

__all__ = ["DynamicsConfig", "Trajectory", "train_linear", "OBJECTIVES", "ALGORITHMS"]

log = logging.getLogger(__name__)

OBJECTIVES = ("logistic", "error")
ALGORITHMS = ("sgd", "rsgd", "esgd")


@dataclass(frozen=True)
class DynamicsConfig:
    """Hyperparameters of one training run (units: ``u = w / sqrt(N)``).

    Attributes:
        algorithm: ``"sgd"``, ``"rsgd"`` or ``"esgd"``.
        objective: ``"logistic"`` or ``"error"``.
        epochs: budget in passes of gradient evaluations over the P samples (all replicas /
            inner steps together).
        steps_per_epoch: minibatch size ``B = ceil(P / steps_per_epoch)``.
        lr: step size in units of ``B / (N Delta)`` (the stability scale of a minibatch of B
            samples of squared norm ``N Delta``); for ``esgd`` it is the inner step ``eta'``.
        num_replicas: y (``rsgd``).
        gamma: coupling, fixed during training (``rsgd``, ``esgd``), in the loss's units.
        inner_steps: L (``esgd``).
        noise: Langevin noise ``eps`` of the inner loop (``esgd``).
        temp0, temp1: smoothing temperature of the step, start and end (``"error"``).
        n_evals: number of checkpoints of the estimator along training.
    """

    algorithm: str = "sgd"
    objective: str = "logistic"
    epochs: float = 40.0
    steps_per_epoch: int = 20
    lr: float = 0.5
    num_replicas: int = 5
    gamma: float = 0.0
    inner_steps: int = 5
    noise: float = 1e-4
    temp0: float = 1.0
    temp1: float = 0.05

    n_evals: int = 40

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"Invalid algorithm: {self.algorithm!r} (valid: {ALGORITHMS})")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"Invalid objective: {self.objective!r} (valid: {OBJECTIVES})")
        for name in ("epochs", "lr", "temp0", "temp1"):
            val = getattr(self, name)
            if not (math.isfinite(val) and val > 0):
                raise ValueError(f"Invalid {name} value: {val!r} (expected > 0)")
        for name in ("gamma", "noise"):
            val = getattr(self, name)
            if not (math.isfinite(val) and val >= 0):
                raise ValueError(f"Invalid {name} value: {val!r} (expected >= 0)")
        for name in ("steps_per_epoch", "num_replicas", "inner_steps", "n_evals"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"Invalid {name} value: {val!r} (expected an int >= 1)")


@dataclass
class Trajectory:
    """Checkpoints of the estimator: ``w[k]`` (``w = sqrt(N) u``, shape ``[K, N]``) after
    ``epochs[k]`` epochs of gradient evaluations, and its training loss / error there."""

    epochs: np.ndarray
    w: np.ndarray
    train_error: np.ndarray


def _loss(out: Tensor, y: Tensor, u: Tensor, objective: str, temp: float) -> Tensor:
    h = y * out
    if objective == "logistic":
        return nn.functional.softplus(-h).mean()
    return torch.sigmoid(-h / (u.norm() * temp)).mean()


def _project_(u: Tensor) -> None:
    u.div_(u.norm(dim=-1, keepdim=True).clamp_min(1e-30))


def train_linear(X: np.ndarray, y: np.ndarray, cfg: DynamicsConfig, seed: int = 0) -> Trajectory:
    """Train the linear classifier with ``cfg`` and return the estimator's checkpoints.

    The estimator is the single model (``sgd``), the replicas' centre (``rsgd``) or the outer
    variable (``esgd``). Initialisation: ``u ~ N(0, I / N)`` per replica (independent), so
    ``||u|| ~ 1``.

    Args:
        X: Inputs ``[P, N]``.
        y: Labels ``[P]`` in {-1, +1}.
        cfg: The run's :class:`DynamicsConfig`.
        seed: Seeds the initialisation and the minibatch order.

    Raises:
        ValueError: on a bad configuration or shapes.
    """
    cfg.validate()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] != len(y):
        raise ValueError(f"Invalid shapes: X {X.shape}, y {np.shape(y)}")
    p, n = X.shape
    gen = torch.Generator().manual_seed(seed)
    Xt = torch.from_numpy(X)
    yt = torch.from_numpy(np.asarray(y, dtype=np.float64))
    bsz = math.ceil(p / cfg.steps_per_epoch)
    delta_hat = float((Xt * Xt).sum(1).mean()) / n  # ~ Delta, from training data only
    lr = cfg.lr * bsz / (n * delta_hat)
    y_rep = cfg.num_replicas if cfg.algorithm == "rsgd" else 1
    sphere = cfg.objective == "error"

    def factory() -> nn.Module:
        lin = nn.Linear(n, 1, bias=False).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(1, n, generator=gen, dtype=torch.float64) / math.sqrt(n))
            if sphere:
                _project_(lin.weight)
        return lin

    # batches drawn with replacement-free shuffles per stream (replica / closure call)
    perms: dict[int, list[Tensor]] = {}

    def batch(stream: int) -> tuple[Tensor, Tensor]:
        queue = perms.setdefault(stream, [])
        if not queue:
            queue.extend(torch.randperm(p, generator=gen).split(bsz))
        idx = queue.pop()
        return Xt[idx], yt[idx]

    reps = Replicas(factory, y_rep)
    if cfg.algorithm == "esgd":
        params = list(reps[0].parameters())
        opt: torch.optim.Optimizer = EntropySGD(
            params,
            lr=1.0,
            inner_steps=cfg.inner_steps,
            inner_lr=lr,
            noise=cfg.noise,
            mu_decay=0.75,
            gamma=cfg.gamma,
            scale_by_gamma=False,
            seed=seed,
        )
        evals_per_step = cfg.inner_steps * bsz
    else:
        opt = ReplicatedSGD(reps, lr=lr, gamma=cfg.gamma)
        evals_per_step = y_rep * bsz
    total_steps = max(1, round(cfg.epochs * p / evals_per_step))
    eval_at = set(np.unique(np.linspace(1, total_steps, cfg.n_evals).round().astype(int)).tolist())
    temp = cfg.temp0
    ep, ws, errs = [], [], []

    def estimator() -> Tensor:
        if cfg.algorithm == "rsgd":
            return reps.flat_params[0].detach().mean(0)
        return reps[0].weight.detach().reshape(-1)

    for t in range(1, total_steps + 1):
        if sphere:
            temp = cfg.temp0 * (cfg.temp1 / cfg.temp0) ** ((t - 1) / max(1, total_steps - 1))
        if cfg.algorithm == "esgd":

            def closure(lin: nn.Module = reps[0], temp: float = temp) -> Tensor:
                opt.zero_grad()
                xb, yb = batch(0)
                loss = _loss(lin(xb).squeeze(-1), yb, lin.weight, cfg.objective, temp)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt.zero_grad()
            total = 0.0
            for a, lin in enumerate(reps):
                xb, yb = batch(a)
                total = total + _loss(lin(xb).squeeze(-1), yb, lin.weight, cfg.objective, temp)
            total.backward()
            opt.step()
        if sphere:
            with torch.no_grad():
                for buf in reps.flat_params:
                    _project_(buf)
        if t in eval_at:
            u = estimator()
            with torch.no_grad():
                err = float(((Xt @ u) * yt <= 0).double().mean())
            ep.append(t * evals_per_step / p)
            ws.append(u.numpy() * math.sqrt(n))
            errs.append(err)
    log.debug("%s/%s: %d steps, final train error %.4f", cfg.algorithm, cfg.objective, t, errs[-1])
    return Trajectory(np.asarray(ep), np.stack(ws), np.asarray(errs))
