"""flatminima.gmm.fastdyn against the library optimizers, step by step (float64).

Each test runs :class:`GridDynamics` (numpy, a grid of K configurations at once) and, for every
configuration, :class:`flatminima.optim.ReplicatedSGD` / :class:`flatminima.optim.EntropySGD`
on ``torch.nn.Linear(N, 1, bias=False)`` with the same initial weights, the same minibatches
(``GridDynamics.last_batches``) and, for Entropy-SGD, the library's own noise generator seeded
alike. Every weight is compared after every step. Learning rates and couplings on the library
side are computed here from the formulas (not read from fastdyn).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from flatminima.gmm import classifier_error, sample
from flatminima.gmm.fastdyn import GridDynamics, initial_weights, minibatch_stream, run_grid
from flatminima.optim import EntropySGD, Replicas, ReplicatedSGD

TOL = 1e-10
STEPS = 24


def _unit(X: np.ndarray, steps_per_epoch: int) -> float:
    p, n = X.shape
    bsz = math.ceil(p / steps_per_epoch)
    return bsz / (n * np.mean(np.sum(X * X, 1)) / n)  # B / (N Delta_hat)


def _loss(lin: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: str, temp: float):
    h = y * lin(x).squeeze(-1)
    if objective == "logistic":
        return nn.functional.softplus(-h).mean()
    norm = torch.cat([p.reshape(-1) for p in lin.parameters()]).norm()  # weight and bias
    return torch.sigmoid(-h / (norm * temp)).mean()


def _linear(u: np.ndarray, bias: bool = False) -> nn.Module:
    """``nn.Linear(N, 1)`` holding ``u`` (with ``bias``: its last entry is the bias)."""
    n = u.size - int(bias)
    lin = nn.Linear(n, 1, bias=bias).double()
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(u[:n].copy())[None])
        if bias:
            lin.bias.fill_(float(u[n]))
    return lin


def _flat(lin: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in lin.parameters()]).numpy()


def _schedule(t: int, total: int, hp: dict, scoped: bool, temp0: float = 1.0):
    frac = (t - 1) / max(1, total - 1)
    temp = temp0 * (hp.get("temp1", 0.05) / temp0) ** frac
    gamma = hp.get("gamma", 0.0) * (hp.get("gamma_growth", 1e3) ** frac if scoped else 1.0)
    return temp, gamma


def _rsgd_lockstep(
    X, y, objective, grid, *, reps=3, scoped=False, nesterov=False, cap=None, bias=False
):
    """Max |dw| over every replica, configuration and step."""
    spe = 10
    epochs = STEPS * reps * math.ceil(len(y) / spe) / len(y)
    dyn = GridDynamics(
        X,
        y,
        "rsgd",
        objective,
        grid,
        epochs=epochs,
        num_replicas=reps,
        steps_per_epoch=spe,
        scoped=scoped,
        nesterov=nesterov,
        max_lr_gamma=cap,
        fit_intercept=bias,
        seed=3,
    )
    assert dyn.total_steps == STEPS
    xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    u0 = initial_weights(X.shape[1], reps, 3, sphere=objective == "error")
    if bias:
        u0 = np.hstack([u0, np.zeros((reps, 1))])
    libs = []
    for hp in grid:
        it = iter(u0)
        r = Replicas(lambda it=it: _linear(next(it), bias), reps)
        eta = hp["lr"] * _unit(X, spe)
        libs.append(
            (
                r,
                ReplicatedSGD(
                    r, lr=eta, momentum=hp.get("momentum", 0.0), nesterov=nesterov, gamma=0.0
                ),
                hp,
                eta,
            )
        )
    worst = 0.0
    for t in range(1, STEPS + 1):
        dyn.step()
        for k, (r, opt, hp, eta) in enumerate(libs):
            temp, gamma = _schedule(t, STEPS, hp, scoped)
            opt.param_groups[0]["gamma"] = gamma if cap is None else min(gamma, cap / eta)
            opt.zero_grad()
            sum(
                _loss(lin, xt[idx], yt[idx], objective, temp)
                for lin, idx in zip(r, dyn.last_batches)
            ).backward()
            opt.step()
            w = r.flat_params[0]
            if objective == "error":
                with torch.no_grad():
                    w.div_(w.norm(dim=1, keepdim=True))
            worst = max(worst, float(np.abs(w.detach().numpy() - dyn.u[:, k]).max()))
    return worst, dyn


@pytest.mark.parametrize("objective", ["logistic", "error"])
def test_rsgd_equals_replicated_sgd_step_by_step(objective):
    X, y, _ = sample(40, 3.0, 1.0, rho=0.3, seed=0)
    grid = [dict(lr=0.5, gamma=0.3, temp1=0.1), dict(lr=1.0, gamma=3.0, momentum=0.9, temp1=0.1)]
    worst, dyn = _rsgd_lockstep(X, y, objective, grid)
    assert worst <= TOL
    assert np.abs(dyn.u - initial_weights(40, 3, 3, objective == "error")[:, None]).max() > 0.1


def test_rsgd_nesterov_and_sgd_single_replica():
    X, y, _ = sample(30, 2.0, 1.0, seed=1)
    worst, _ = _rsgd_lockstep(
        X, y, "logistic", [dict(lr=0.7, gamma=1.0, momentum=0.5)], nesterov=True
    )
    assert worst <= TOL
    worst1, _ = _rsgd_lockstep(X, y, "logistic", [dict(lr=0.7, gamma=5.0)], reps=1)
    assert worst1 <= TOL  # one replica: plain torch SGD, the coupling vanishes


def test_scoped_coupling_cap_is_the_library_with_a_capped_gamma():
    X, y, _ = sample(30, 2.0, 1.0, seed=2)
    grid = [dict(lr=1.0, gamma=0.3, gamma_growth=25.0)]  # eta gamma_t: 0.06 -> 1.5 (stable)
    worst, capped = _rsgd_lockstep(X, y, "logistic", grid, scoped=True, cap=1.0)
    assert worst <= TOL
    worst_off, uncapped = _rsgd_lockstep(X, y, "logistic", grid, scoped=True)
    assert worst_off <= TOL  # off by default: the library's update with the full gamma_t
    eta = _unit(X, 10)
    assert 1.0 < 0.3 * 25.0 * eta < 2.0  # the cap binds at the end of this schedule ...
    assert np.abs(capped.u - uncapped.u).max() > 1e-3  # ... and changes the trajectory


def _esgd_lockstep(
    X, y, objective, grid, *, scale_by_gamma=False, nesterov=False, cap=None, bias=False
):
    spe, L = 8, 3
    epochs = STEPS * L * math.ceil(len(y) / spe) / len(y)
    dyn = GridDynamics(
        X,
        y,
        "esgd",
        objective,
        grid,
        epochs=epochs,
        inner_steps=L,
        steps_per_epoch=spe,
        mu_decay=0.75,
        scale_by_gamma=scale_by_gamma,
        nesterov=nesterov,
        max_lr_gamma=cap,
        fit_intercept=bias,
        seed=5,
    )
    assert dyn.total_steps == STEPS
    xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    u0 = initial_weights(X.shape[1], 1, 5, sphere=objective == "error")[0]
    if bias:
        u0 = np.append(u0, 0.0)
    libs = []
    for hp in grid:
        lin = _linear(u0, bias)
        eta = hp["lr"] * _unit(X, spe)
        gamma = hp["gamma"] if cap is None else min(hp["gamma"], cap / eta)
        opt = EntropySGD(
            list(lin.parameters()),
            lr=hp.get("outer_lr", 1.0),
            momentum=hp.get("momentum", 0.0),
            nesterov=nesterov,
            inner_steps=L,
            inner_lr=eta,
            noise=hp.get("noise", 1e-2),
            mu_decay=0.75,
            gamma=gamma,
            scale_by_gamma=scale_by_gamma,
            seed=5,
        )
        libs.append((lin, opt, hp))
    worst = 0.0
    for t in range(1, STEPS + 1):
        dyn.step()
        for k, (lin, opt, hp) in enumerate(libs):
            temp, _ = _schedule(t, STEPS, hp, False)
            batches = list(dyn.last_batches)

            def closure(lin=lin, opt=opt, temp=temp, batches=batches):
                opt.zero_grad()
                idx = batches.pop(0)
                loss = _loss(lin, xt[idx], yt[idx], objective, temp)
                loss.backward()
                return loss

            opt.step(closure)
            if objective == "error":
                with torch.no_grad():
                    norm = float(np.linalg.norm(_flat(lin)))
                    for p in lin.parameters():
                        p.div_(norm)
            worst = max(worst, float(np.abs(_flat(lin) - dyn.u[0, k]).max()))
    return worst, dyn


@pytest.mark.parametrize("objective", ["logistic", "error"])
def test_esgd_equals_entropy_sgd_step_by_step_with_its_noise(objective):
    X, y, _ = sample(40, 3.0, 1.0, rho=0.3, seed=0)
    grid = [
        dict(lr=0.5, gamma=0.3, noise=1e-2, temp1=0.1),
        dict(lr=1.0, gamma=3.0, noise=0.05, temp1=0.1),
    ]
    worst, _ = _esgd_lockstep(X, y, objective, grid)
    assert worst <= TOL


def test_esgd_outer_momentum_scale_by_gamma_nesterov():
    X, y, _ = sample(30, 2.0, 1.0, seed=4)
    grid = [dict(lr=0.5, gamma=0.5, noise=0.0, outer_lr=2.0, momentum=0.9)]
    worst, _ = _esgd_lockstep(X, y, "logistic", grid, scale_by_gamma=True, nesterov=True)
    assert worst <= TOL


def test_esgd_coupling_cap_is_entropy_sgd_with_a_capped_gamma():
    X, y, _ = sample(30, 2.0, 1.0, seed=6)
    grid = [dict(lr=1.0, gamma=30.0, noise=0.01)]  # eta gamma > 1: the cap binds
    assert 30.0 * _unit(X, 8) > 1.0
    worst, capped = _esgd_lockstep(X, y, "logistic", grid, scale_by_gamma=True, cap=1.0)
    assert worst <= TOL
    _, uncapped = _esgd_lockstep(X, y, "logistic", grid, scale_by_gamma=True)
    assert np.abs(capped.u - uncapped.u).max() > 1e-3


@pytest.mark.parametrize("objective", ["logistic", "error"])
def test_bias_is_the_library_bias_parameter(objective):
    X, y, _ = sample(40, 3.0, 1.0, rho=0.2, seed=7)
    grid = [dict(lr=0.5, gamma=0.3, temp1=0.1, noise=0.02), dict(lr=1.0, gamma=3.0, temp1=0.1)]
    worst, dyn = _rsgd_lockstep(X, y, objective, grid, bias=True)
    assert worst <= TOL and dyn.u.shape == (3, 2, 41)
    assert np.abs(dyn.u[..., -1]).min() > 1e-3  # the bias moved off 0
    worst, _ = _esgd_lockstep(X, y, objective, grid, bias=True)
    assert worst <= TOL


def test_run_grid_bias_learns_the_class_imbalance():
    X, y, v = sample(100, 4.0, 1.0, rho=0.2, seed=0)
    kw = dict(epochs=40, num_replicas=3, n_evals=2, seed=0)
    with_b = run_grid(X, y, "rsgd", "logistic", [dict(lr=0.5, gamma=0.3)], fit_intercept=True, **kw)
    no_b = run_grid(X, y, "rsgd", "logistic", [dict(lr=0.5, gamma=0.3)], **kw)
    assert not no_b.b.any() and no_b.w.shape == with_b.w.shape == (2, 1, 100)
    assert with_b.b[-1, 0] < 0  # most labels are -1: the bias leans that way
    eps_b = classifier_error(with_b.w[-1, 0], with_b.b[-1, 0], v, 1.0, 0.2)
    eps_0 = classifier_error(no_b.w[-1, 0], 0.0, v, 1.0, 0.2)
    assert eps_b < eps_0


def test_langevin_noise_scale_is_sqrt_2_eta_eps():
    # L = 1, mu_decay = 0, outer_lr = 1: x_1 = x_0 - eta g(x_0) + sqrt(2 eta) eps xi, so the
    # difference to the noiseless run is the noise alone; its std must be sqrt(2 eta) eps.
    X, y, _ = sample(2000, 0.5, 1.0, seed=0)
    grid = [dict(lr=0.5, gamma=1.0, noise=0.1), dict(lr=2.0, gamma=1.0, noise=0.03)]
    kw = dict(inner_steps=1, mu_decay=0.0, steps_per_epoch=4, epochs=0.25, seed=1)
    noisy = GridDynamics(X, y, "esgd", "logistic", grid, **kw)
    clean = GridDynamics(X, y, "esgd", "logistic", [dict(g, noise=0.0) for g in grid], **kw)
    noisy.step()
    clean.step()
    n = X.shape[1]
    for k, g in enumerate(grid):
        eta = g["lr"] * _unit(X, 4)
        z = (noisy.u[0, k] - clean.u[0, k]) / (math.sqrt(2 * eta) * g["noise"])
        assert abs(z.mean()) < 4 / math.sqrt(n)
        assert abs(z.std() - 1.0) < 4 / math.sqrt(2 * n)  # SE of a sample std: 1 / sqrt(2n)


def test_run_grid_checkpoints_are_the_centre_of_the_dynamics():
    X, y, v = sample(60, 3.0, 1.0, seed=1)
    grid = [dict(lr=0.2, gamma=0.3), dict(lr=1.0, gamma=3.0)]
    run = run_grid(X, y, "rsgd", "logistic", grid, epochs=6, num_replicas=3, seed=2, n_evals=3)
    dyn = GridDynamics(X, y, "rsgd", "logistic", grid, epochs=6, num_replicas=3, seed=2)
    for _ in range(dyn.total_steps):
        dyn.step()
    np.testing.assert_array_equal(run.w[-1], dyn.u.mean(0) * math.sqrt(60))
    assert run.grad_evals == dyn.total_steps * 3 * dyn.bsz
    assert not run.diverged.any()
    assert classifier_error(run.w[-1, 1], 0.0, v, 1.0) < 0.4  # it learns (chance: 0.5)


def test_minibatch_stream_covers_every_sample_once_per_pass():
    it = minibatch_stream(23, 5, seed=0, stream=1)
    first = [next(it) for _ in range(5)]
    assert sorted(np.concatenate(first).tolist()) == list(range(23))
    assert {len(b) for b in first} <= {4, 5}


def test_divergence_is_flagged_without_numpy_warnings():
    X, y, _ = sample(30, 2.0, 1.0, seed=0)
    grid = [dict(lr=0.5, gamma=0.3), dict(lr=0.5, gamma=1e6)]  # eta gamma >> 2: unstable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = run_grid(X, y, "rsgd", "logistic", grid, epochs=20, num_replicas=3, n_evals=2)
    assert run.diverged.tolist() == [False, True]
    assert np.isfinite(run.w[-1, 0]).all() and not np.isfinite(run.w[-1, 1]).all()


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(temp0=0.0), "temp0"),
        (dict(grid=[dict(lr=1.0, momentum=-1.0)]), "momentum"),
        (dict(grid=[dict(lr=1.0, outer_lr=0.0)]), "outer_lr"),
        (dict(grid=[dict(lr=1.0, noise=float("nan"))]), "noise"),
        (dict(max_lr_gamma=-1.0), "max_lr_gamma"),
        (dict(mu_decay=1.0), "mu_decay"),
        (dict(n_evals=0), "n_evals"),
        (dict(inner_steps=True), "inner_steps"),
    ],
)
def test_bad_arguments_are_named(kw, name):
    X, y, _ = sample(10, 1.0, 1.0, seed=0)
    grid = kw.pop("grid", [dict(lr=1.0)])
    with pytest.raises(ValueError, match=name):
        run_grid(X, y, "esgd", "logistic", grid, **kw)
