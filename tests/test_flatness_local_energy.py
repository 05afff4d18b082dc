"""Tests of flatminima.flatness.local_energy against closed forms and exact invariances."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatminima.flatness import local_energy
from flatminima.flatness.perturb import NoisePerturber


def _linear_data(n: int = 64, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, y


def _linear_model(d: int = 5, bias: bool = True, seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d, 1, bias=bias).double()


# Convention: loss_fn = F.mse_loss (mean of (f - y)^2, no 1/2). For f(x) = w.x + b, a weight
# perturbation adds delta = sigma * (sum_i x_i w_i xi_i + b xi_b) (multiplicative) or
# sigma * (sum_i x_i xi_i + xi_b) (additive), with zero mean, so
# E[(f + delta - y)^2] - (f - y)^2 = E[delta^2]:
#   multiplicative: sigma^2 * (mean_n sum_i x_ni^2 w_i^2 + b^2)
#   additive:       sigma^2 * (mean_n sum_i x_ni^2 + 1)
@pytest.mark.parametrize("noise", ["multiplicative", "additive"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_squared_loss_closed_form(noise: str, bias: bool) -> None:
    x, y = _linear_data()
    model = _linear_model(bias=bias)
    # put w at the least-squares fit: the residual is orthogonal to x (and to 1 with a bias), so
    # the cross term 2 mean_n (f_n - y_n) delta_n vanishes draw by draw and the SE is small
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) if bias else x
    sol = torch.linalg.lstsq(xa, y).solution[:, 0]
    with torch.no_grad():
        model.weight.copy_(sol[: x.shape[1]].unsqueeze(0))
        if bias:
            model.bias.copy_(sol[-1:])
    sigmas = [0.05, 0.2, 0.5]
    r = local_energy(
        model,
        (x, y),
        sigmas,
        loss_fn=F.mse_loss,
        noise=noise,
        n_draws=400,
        classification=False,
        batch_size=16,
    )
    w = model.weight.detach()[0]
    b2 = model.bias.detach()[0] ** 2 if bias else 0.0
    if noise == "multiplicative":
        per_sigma2 = float(((x**2) * (w**2)).sum(1).mean() + b2)
    else:
        per_sigma2 = float((x**2).sum(1).mean() + (1.0 if bias else 0.0))
    for s, m, se in zip(r.sigmas, r.delta_loss, r.delta_loss_se):
        exact = s**2 * per_sigma2
        assert se > 0
        assert abs(m - exact) < 3.5 * se, (s, m, exact, se)
        assert se < 0.15 * exact  # the test has power: the SE is small against the value
    with torch.no_grad():
        base = float(F.mse_loss(model(x), y))
    assert r.base_loss == pytest.approx(base, rel=1e-12)
    assert r.delta_error is None and r.base_error is None


def test_sigma_zero_is_exactly_zero_and_common_random_numbers() -> None:
    x = torch.randn(50, 4)
    y = torch.randint(0, 3, (50,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    r = local_energy(model, (x, y), [0.0, 0.1, 0.3], n_draws=5, seed=3)
    assert r.delta_loss[0] == 0.0 and r.delta_error[0] == 0.0
    # each sigma uses the draws seed+d regardless of the other sigmas
    r2 = local_energy(model, (x, y), [0.3], n_draws=5, seed=3)
    assert r2.loss_draws[0] == r.loss_draws[2]
    r3 = local_energy(model, (x, y), [0.3], n_draws=5, seed=4)
    assert r3.loss_draws[0] != r.loss_draws[2]
    # error is the fraction misclassified
    with torch.no_grad():
        err = float((model(x).argmax(1) != y).float().mean())
    assert r.base_error == pytest.approx(err)


def test_multiplicative_noise_matches_manual_perturbation() -> None:
    """One draw of the fast foreach path equals w * (1 + sigma xi) with the same xi."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    pert = NoisePerturber(list(lin.parameters()), "multiplicative")
    pert.perturb_(0.3, seed=11)
    g = torch.Generator().manual_seed(11)
    xi = torch.randn(w0.numel() + b0.numel(), generator=g)
    torch.testing.assert_close(lin.weight.detach(), w0 * (1 + 0.3 * xi[:6].view(2, 3)))
    torch.testing.assert_close(lin.bias.detach(), b0 * (1 + 0.3 * xi[6:]))
    pert.restore_()
    assert torch.equal(lin.weight, w0) and torch.equal(lin.bias, b0)


def test_dataloader_equals_tensor_pair_and_max_samples() -> None:
    x = torch.randn(70, 4)
    y = torch.randint(0, 3, (70,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    a = local_energy(model, (x, y), [0.2], n_draws=3, batch_size=32)
    b = local_energy(model, DataLoader(TensorDataset(x, y), batch_size=7), [0.2], n_draws=3)
    assert a.n_samples == b.n_samples == 70
    # float32 sums in different batch orders: compare the losses, not their tiny differences
    np.testing.assert_allclose(a.loss_draws, b.loss_draws, rtol=1e-6)
    assert a.base_loss == pytest.approx(b.base_loss, rel=1e-6)
    c = local_energy(
        model, DataLoader(TensorDataset(x, y), batch_size=16), [0.2], n_draws=3, max_samples=40
    )
    assert c.n_samples == 40
    with torch.no_grad():
        assert c.base_loss == pytest.approx(float(F.cross_entropy(model(x[:40]), y[:40])), rel=1e-5)


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def _trained_bn_net() -> _BNNet:
    torch.manual_seed(0)
    net = _BNNet()
    net.train()
    with torch.no_grad():
        for _ in range(5):
            net(torch.randn(32, 4) * 2 + 1)
    return net


def _state(model: nn.Module):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


def _assert_same_state(model: nn.Module, state) -> None:
    sd, modes, rg = state
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
        assert v.dtype == sd[k].dtype
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == rg


@pytest.mark.parametrize("bn", ["eval", "recalibrate"])
def test_model_and_global_rng_unchanged(bn: str) -> None:
    net = _trained_bn_net()
    net.fc2.bias.requires_grad_(False)
    net.drop.eval()  # mixed modes must come back as they were
    state = _state(net)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)  # consumes global RNG
    torch.manual_seed(123)
    np.random.seed(7)
    t_state, n_state = torch.get_rng_state(), np.random.get_state()
    r = local_energy(net, loader, [0.0, 0.1], n_draws=3, bn=bn, bn_data=(x, y))
    assert r.delta_loss[1] != 0.0
    assert torch.equal(torch.get_rng_state(), t_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), n_state))
    _assert_same_state(net, state)


@pytest.mark.parametrize("bn", ["eval", "recalibrate"])
def test_state_restored_when_loss_raises(bn: str) -> None:
    net = _trained_bn_net()
    state = _state(net)
    calls = {"n": 0}

    def bad_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 4:  # after the base pass and a few perturbed batches
            raise RuntimeError("loss exploded")
        return F.cross_entropy(out, y)

    data = (torch.randn(40, 4), torch.randint(0, 3, (40,)))
    t_state = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="exploded"):
        local_energy(net, data, [0.5], n_draws=3, loss_fn=bad_loss, bn=bn, batch_size=10)
    assert calls["n"] == 5
    assert torch.equal(torch.get_rng_state(), t_state)
    _assert_same_state(net, state)


def test_bn_eval_closed_form_and_recalibrate_cancels_bias_shift() -> None:
    """Linear(d,1) -> BatchNorm1d(1) with additive noise on the linear layer only.

    eval: BN is the fixed affine map z -> g (z - mu) / sqrt(v + eps) + beta, so with MSE
    delta = sigma^2 g^2 / (v + eps) * (mean_n sum_i x_ni^2 + 1).
    recalibrate: noise on the bias alone shifts every pre-activation by the same amount, which
    the recomputed running mean removes exactly: delta = 0 (up to rounding).
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 1), nn.BatchNorm1d(1)).double()
    net.train()
    with torch.no_grad():
        for _ in range(10):
            net(torch.randn(64, 3, dtype=torch.float64) * 1.5 + 0.5)
        net[1].weight.fill_(1.7)
    x = torch.randn(64, 3, dtype=torch.float64)
    y = torch.randn(64, 1, dtype=torch.float64)
    bn = net[1]
    r = local_energy(
        net,
        (x, y),
        [0.1, 0.3],
        loss_fn=F.mse_loss,
        noise="additive",
        n_draws=400,
        params=["0.weight", "0.bias"],
        classification=False,
    )
    scale = float(bn.weight.detach() ** 2 / (bn.running_var + bn.eps))
    for s, m, se in zip(r.sigmas, r.delta_loss, r.delta_loss_se):
        exact = s**2 * scale * float((x**2).sum(1).mean() + 1)
        assert abs(m - exact) < 3.5 * se, (m, exact, se)

    r_eval = local_energy(
        net,
        (x, y),
        [0.5],
        loss_fn=F.mse_loss,
        noise="additive",
        n_draws=5,
        params=lambda n, p: n == "0.bias",
        classification=False,
    )
    r_rec = local_energy(
        net,
        (x, y),
        [0.5],
        loss_fn=F.mse_loss,
        noise="additive",
        n_draws=5,
        params=["0.bias"],
        bn="recalibrate",
        classification=False,
    )
    assert r_eval.delta_loss[0] > 1e-3
    assert abs(r_rec.delta_loss[0]) < 1e-10


def test_recalibrate_base_matches_swa_update_bn() -> None:
    import copy

    from torch.optim.swa_utils import update_bn

    net = _trained_bn_net()
    x, y = torch.randn(48, 4), torch.randint(0, 3, (48,))
    ref = copy.deepcopy(net)
    update_bn([x[i : i + 16] for i in range(0, 48, 16)], ref)
    ref.eval()
    with torch.no_grad():
        base = float(F.cross_entropy(ref(x), y))
    r = local_energy(net, (x, y), [0.1], n_draws=2, bn="recalibrate", batch_size=16)
    assert r.base_loss == pytest.approx(base, rel=1e-5)


def test_params_as_views_into_flat_buffer() -> None:
    """rSGD-style replicas: parameters are views into one flat buffer; results match a plain
    model, the buffer comes back bit for bit and the views stay views."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    view_net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    flat = torch.cat([p.detach().reshape(-1) for p in plain.parameters()])
    offset = 0
    for mod in (view_net[0], view_net[2]):
        for name in ("weight", "bias"):
            shape = getattr(mod, name).shape
            n = math.prod(shape)
            mod._parameters[name] = nn.Parameter(flat[offset : offset + n].view(shape))
            offset += n
    flat_before = flat.clone()
    ptrs = [p.data_ptr() for p in view_net.parameters()]
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    a = local_energy(plain, (x, y), [0.2, 0.5], n_draws=4)
    b = local_energy(view_net, (x, y), [0.2, 0.5], n_draws=4)
    assert a.loss_draws == b.loss_draws
    assert torch.equal(flat, flat_before)
    assert [p.data_ptr() for p in view_net.parameters()] == ptrs
    assert view_net[0].weight.data_ptr() == flat.data_ptr()


def test_result_rows_and_dict() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(20, 3), torch.randn(20, 1)
    r = local_energy(model, (x, y), [0.1, 0.2], loss_fn=F.mse_loss, n_draws=2, classification=False)
    rows = r.to_rows()
    assert [row["sigma"] for row in rows] == [0.1, 0.2]
    assert math.isnan(rows[0]["delta_error"]) and rows[0]["n_draws"] == 2
    d = r.to_dict()
    json.dumps(d)
    assert d["delta_loss"] == r.delta_loss


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sigmas": [-0.1]}, "sigma"),
        ({"sigmas": [float("nan")]}, "sigma"),
        ({"sigmas": []}, "sigmas"),
        ({"n_draws": 0}, "n_draws"),
        ({"noise": "gaussian"}, "gaussian"),
        ({"bn": "train"}, "train"),
        ({"params": ["nope"]}, "nope"),
        ({"params": lambda n, p: False}, "selected no"),
        ({"max_samples": 0}, "max_samples"),
    ],
)
def test_bad_input_raises(kwargs, match) -> None:
    model = nn.Linear(3, 2)
    args = {"sigmas": [0.1], **kwargs}
    sig = args.pop("sigmas")
    with pytest.raises(ValueError, match=match):
        local_energy(model, (torch.randn(4, 3), torch.randint(0, 2, (4,))), sig, **args)


def test_empty_data_and_parameterless_model_raise() -> None:
    with pytest.raises(ValueError, match="empty"):
        local_energy(nn.Linear(3, 2), (torch.randn(0, 3), torch.zeros(0, dtype=torch.long)), 0.1)
    with pytest.raises(ValueError, match="empty"):
        local_energy(nn.Linear(3, 2), [], 0.1)
    with pytest.raises(ValueError, match="no parameters"):
        local_energy(nn.ReLU(), (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)), 0.1)
