"""Tests of the local free entropy against the Gaussian closed form.

For E(x) = 1/2 (x - w0)^T H (x - w0), measured at w = w0 + a with g = H a and u = w' - w ~
N(0, s^2 I), s^2 = 1 / (beta gamma):

    E(w + u) - E(w) = g.u + 1/2 u^T H u,
    E_u exp(-beta (g.u + 1/2 u^T H u)) = det(I + beta s^2 H)^(-1/2)
                                         * exp(beta^2/2 g^T (s^-2 I + beta H)^-1 g),

so Phi = -1/2 sum_i log(1 + lambda_i / gamma) + (beta / 2) g^T (gamma I + H)^-1 g: beta enters
only through the gradient term and drops out at the minimum.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatminima.flatness import (
    local_free_entropy,
    local_free_entropy_fn,
    quadratic_local_free_entropy,
    tilted_quadrature,
)

DT = torch.float64


def _spd(dim: int, lo: float, hi: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=DT))
    lam = torch.linspace(lo, hi, dim, dtype=DT)
    return q @ torch.diag(lam) @ q.T


def test_closed_form_by_numerical_integration_2d() -> None:
    """The closed form against a direct 2-d quadrature of log E_N exp(-beta dE)."""
    h = torch.tensor([[2.0, 0.6], [0.6, 0.5]], dtype=DT)
    a = torch.tensor([0.3, -0.7], dtype=DT)
    gamma, beta = 0.8, 1.7
    s = 1.0 / math.sqrt(beta * gamma)
    # Gauss-Hermite for u ~ N(0, s^2 I): u = sqrt(2) s z, weights / sqrt(pi) per dim
    z, wz = np.polynomial.hermite.hermgauss(80)
    u1, u2 = np.meshgrid(math.sqrt(2) * s * z, math.sqrt(2) * s * z, indexing="ij")
    u = np.stack([u1.ravel(), u2.ravel()], 1)
    w = np.outer(wz, wz).ravel() / math.pi
    hn, an = h.numpy(), a.numpy()

    def e(x: np.ndarray) -> np.ndarray:
        return 0.5 * np.einsum("ni,ij,nj->n", x, hn, x)

    de = e(an[None] + u) - e(an[None])
    numeric = math.log(float((w * np.exp(-beta * de)).sum()))
    assert quadratic_local_free_entropy(h, gamma, beta, offset=a) == pytest.approx(
        numeric, rel=1e-9
    )
    # at the minimum beta drops out
    assert quadratic_local_free_entropy(h, gamma, 0.1) == quadratic_local_free_entropy(h, gamma, 9)
    lam = torch.linalg.eigvalsh(h)
    assert quadratic_local_free_entropy(h, gamma) == pytest.approx(
        float(-0.5 * torch.log1p(lam / gamma).sum()), rel=1e-12
    )


def test_quadrature_on_exact_tilted_means() -> None:
    """With the exact <dE>_t = 1/2 sum_i lambda_i / (beta (gamma + t lambda_i)) (p_t is Gaussian
    with precision beta (gamma + t lambda_i) along eigenvector i), -beta * quadrature = Phi."""
    lam = np.linspace(0.1, 10.0, 50)
    for gamma, beta, n_t, rtol in [
        (1.0, 1.0, 8, 1e-5),
        (0.1, 3.0, 16, 1e-6),
        (0.01, 1.0, 32, 1e-7),
    ]:
        t, c = tilted_quadrature(n_t, 2.0)
        f = 0.5 * (lam[None] / (beta * (gamma + t[:, None] * lam[None]))).sum(1)
        assert -beta * float((c * f).sum()) == pytest.approx(
            -0.5 * np.log1p(lam / gamma).sum(), rel=rtol
        )
    t, c = tilted_quadrature(5, 1.0)
    assert c.sum() == pytest.approx(1.0) and ((t > 0) & (t < 1)).all()


@pytest.mark.parametrize("dim, lo, hi", [(2, 0.5, 4.0), (10, 0.1, 5.0), (100, 0.1, 3.0)])
def test_mala_matches_closed_form_at_minimum(dim: int, lo: float, hi: float) -> None:
    h = _spd(dim, lo, hi, seed=dim)
    w0 = torch.randn(dim, dtype=DT, generator=torch.Generator().manual_seed(1))
    gamma, beta = 1.0, 2.0

    def energy(x: torch.Tensor) -> torch.Tensor:  # [C, D] -> [C]
        d = x - w0
        return 0.5 * ((d @ h) * d).sum(-1)

    r = local_free_entropy_fn(
        energy, w0, gamma, beta, n_t=8, n_chains=8, n_steps=80, burn_in=40, vectorized=True, seed=0
    )
    exact = quadratic_local_free_entropy(h, gamma)
    assert r.stderr > 0
    # quadrature error with n_t=8, t_power=2 is < 1e-4 relative here (see the test above)
    assert abs(r.estimate - exact) < 4 * r.stderr + 1e-3 * abs(exact), (r.estimate, exact, r.stderr)
    assert r.stderr < 0.05 * abs(exact)  # the check has power
    assert all(0.3 < a < 0.9 for a in r.acceptance)
    assert len(r.mean_delta_energy) == 8 and r.method == "mala"
    # <dE>_t decreases with t (the tilt pulls the chains into the well)
    assert r.mean_delta_energy[0] > r.mean_delta_energy[-1]


def test_mala_off_minimum_beta_dependence() -> None:
    dim = 10
    h = _spd(dim, 0.2, 4.0, seed=3)
    a = torch.linspace(-0.5, 0.5, dim, dtype=DT)
    gamma = 0.5

    def energy(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((x @ h) * x).sum(-1)

    for beta in (0.5, 3.0):
        r = local_free_entropy_fn(
            energy,
            a,
            gamma,
            beta,
            n_t=8,
            n_chains=8,
            n_steps=80,
            burn_in=40,
            vectorized=True,
            seed=1,
        )
        exact = quadratic_local_free_entropy(h, gamma, beta, offset=a)
        assert abs(r.estimate - exact) < 4 * r.stderr + 1e-3 * abs(exact), (beta, r, exact)
    # beta matters here: the two exact values differ by much more than the errors
    assert (
        abs(
            quadratic_local_free_entropy(h, gamma, 0.5, a)
            - quadratic_local_free_entropy(h, gamma, 3.0, a)
        )
        > 1.0
    )


def test_ula_small_step_close_and_unvectorized() -> None:
    h = torch.diag(torch.tensor([0.5, 2.0, 1.0], dtype=DT))

    def energy(x: torch.Tensor) -> torch.Tensor:  # one state at a time
        return 0.5 * x @ h @ x

    exact = quadratic_local_free_entropy(h, 1.0)
    r = local_free_entropy_fn(
        energy,
        torch.zeros(3, dtype=DT),
        1.0,
        1.0,
        n_t=6,
        n_chains=4,
        n_steps=100,
        burn_in=20,
        method="ula",
        step_size=0.02,
        seed=2,
    )
    # ULA bias O(h): variance inflated by 1/(1 - h a/2) <= 1.03 here
    assert abs(r.estimate - exact) < 4 * r.stderr + 0.05 * abs(exact)
    assert all(math.isnan(a) for a in r.acceptance)


def test_model_linear_mse_matches_closed_form() -> None:
    """Linear(3, 1) with mean-squared loss: E is exactly quadratic in (w, b) with
    H = 2 mean_n [x_n, 1][x_n, 1]^T and gradient g = grad E at the current weights."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    x = torch.randn(40, 3, dtype=DT)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=DT) + 0.3
    m = 32  # the measure uses the first max_samples=32 samples
    xa = torch.cat([x, torch.ones(40, 1, dtype=DT)], 1)[:m]
    h = 2 * xa.T @ xa / m
    wflat = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    w_star = torch.linalg.solve(h, 2 * xa.T @ y[:m, 0] / m)
    gamma, beta = 2.0, 0.5
    exact = quadratic_local_free_entropy(h, gamma, beta, offset=wflat - w_star)
    before = [p.detach().clone() for p in model.parameters()]
    state = torch.get_rng_state()
    r = local_free_entropy(
        model,
        (x, y),
        gamma,
        beta,
        loss_fn=F.mse_loss,
        n_t=6,
        n_chains=4,
        n_steps=60,
        burn_in=30,
        batch_size=32,
        max_samples=32,
        seed=0,
    )
    assert abs(r.estimate - exact) < 4 * r.stderr + 2e-3 * abs(exact), (r.estimate, exact)
    with torch.no_grad():
        assert r.base_energy == pytest.approx(float(F.mse_loss(model(x[:m]), y[:m])), rel=1e-12)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert torch.equal(torch.get_rng_state(), state)


def test_model_state_restored_when_loss_raises() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.train()
    model[2].bias.requires_grad_(False)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}

    def bad(out, y):
        calls["n"] += 1
        if calls["n"] > 30:
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    data = (torch.randn(20, 3), torch.randint(0, 2, (20,)))
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        local_free_entropy(model, data, 1.0, 1.0, loss_fn=bad, n_chains=2, n_steps=5, burn_in=5)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert model.training and model[1].training
    assert not model[2].bias.requires_grad and model[0].weight.requires_grad
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": -1.0}, "gamma"),
        ({"beta": 0.0}, "beta"),
        ({"method": "hmc"}, "hmc"),
        ({"n_chains": 1}, "n_chains"),
        ({"n_steps": 0}, "n_steps"),
        ({"step_size": -0.1}, "step_size"),
        ({"n_t": 0}, "n_t"),
    ],
)
def test_bad_input_raises(kwargs, match) -> None:
    args = {"gamma": 1.0, "beta": 1.0, **kwargs}
    g, b = args.pop("gamma"), args.pop("beta")
    with pytest.raises(ValueError, match=match):
        local_free_entropy_fn(lambda x: (x**2).sum(), torch.zeros(2), g, b, **args)
    with pytest.raises(ValueError, match=match):
        local_free_entropy(
            nn.Linear(2, 2), (torch.randn(4, 2), torch.zeros(4).long()), g, b, **args
        )
