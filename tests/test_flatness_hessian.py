"""Hessian measures against the dense Hessian of tiny models (torch.autograd.functional)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from flatminima.flatness import hessian_eigenvalues, hessian_trace, hvp
from flatminima.flatness.hessian import _power

DT = torch.float64


def _tiny(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(3, 4)] + ([nn.BatchNorm1d(4)] if bn else []) + [nn.Tanh(), nn.Linear(4, 3)]
    net = nn.Sequential(*layers).double()
    if bn:
        net.train()
        with torch.no_grad():
            for _ in range(3):
                net(torch.randn(16, 3, dtype=DT) + 0.5)
    return net


def _data(n: int = 25):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _dense_hessian(model: nn.Module, x, y, names=None) -> torch.Tensor:
    """Dense Hessian of the mean cross-entropy w.r.t. the (selected) flattened parameters,
    model in eval mode, via torch.autograd.functional.hessian."""
    named = dict(model.named_parameters())
    names = list(named) if names is None else names
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    fixed = {k: v.detach() for k, v in named.items() if k not in names}
    buffers = dict(model.named_buffers())
    was = model.training
    model.eval()

    def f(flat: torch.Tensor) -> torch.Tensor:
        ps = {n: c.view(s) for n, c, s in zip(names, flat.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, {**fixed, **ps, **buffers}, (x,)), y)

    w = torch.cat([named[n].detach().reshape(-1) for n in names])
    h = torch.autograd.functional.hessian(f, w)
    model.train(was)
    return h


def test_hvp_matches_dense() -> None:
    net = _tiny()
    x, y = _data()
    h = _dense_hessian(net, x, y)
    v = torch.randn(h.shape[0], dtype=DT, generator=torch.Generator().manual_seed(2))
    hv = hvp(net, F.cross_entropy, (x, y), v, batch_size=7)  # uneven batches: weighted mean
    torch.testing.assert_close(hv, h @ v, rtol=1e-10, atol=1e-12)
    # list form
    vs = [
        c.view_as(p)
        for c, p in zip(v.split([p.numel() for p in net.parameters()]), net.parameters())
    ]
    hvs = hvp(net, F.cross_entropy, (x, y), vs)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in hvs]), h @ v)


def test_lanczos_top_k_matches_eigvalsh() -> None:
    net = _tiny()
    x, y = _data()
    dense = torch.linalg.eigvalsh(_dense_hessian(net, x, y)).flip(0)
    r = hessian_eigenvalues(net, F.cross_entropy, (x, y), k=3, method="lanczos", max_iter=40)
    assert r.converged
    torch.testing.assert_close(
        torch.tensor(r.eigenvalues, dtype=DT), dense[:3], rtol=1e-6, atol=1e-9
    )
    # eigenvector of the top value: H v = lambda v
    h = _dense_hessian(net, x, y)
    v = r.eigenvectors[0]
    torch.testing.assert_close(h @ v, r.eigenvalues[0] * v, rtol=1e-4, atol=1e-6)


def test_power_top_k_matches_eigvalsh() -> None:
    net = _tiny()
    x, y = _data()
    dense = torch.linalg.eigvalsh(_dense_hessian(net, x, y)).flip(0)
    r1 = hessian_eigenvalues(
        net, F.cross_entropy, (x, y), k=1, method="power", max_iter=500, tol=1e-10
    )
    assert r1.eigenvalues[0] == pytest.approx(float(dense[0]), rel=1e-5)
    r2 = hessian_eigenvalues(
        net, F.cross_entropy, (x, y), k=2, method="power", max_iter=2000, tol=1e-12
    )
    assert r2.converged and dense[-1] < 0  # the shifted block path is exercised
    torch.testing.assert_close(
        torch.tensor(r2.eigenvalues, dtype=DT), dense[:2], rtol=1e-4, atol=1e-8
    )


def test_power_finds_largest_algebraic_not_magnitude() -> None:
    """Spectrum {5, 1, 0.5, -8}: plain power iteration would return -8."""
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=DT, generator=torch.Generator().manual_seed(0)))
    a = q @ torch.diag(torch.tensor([5.0, 1.0, 0.5, -8.0], dtype=DT)) @ q.T
    gen = torch.Generator().manual_seed(0)
    vals, _, _, ok = _power(lambda v: a @ v, 4, 2, 5000, 1e-12, gen, torch.device("cpu"))
    assert ok
    torch.testing.assert_close(vals, torch.tensor([5.0, 1.0], dtype=DT), rtol=1e-6, atol=1e-8)


def test_trace_hutchinson_within_stderr() -> None:
    net = _tiny()
    x, y = _data()
    exact = float(torch.trace(_dense_hessian(net, x, y)))
    r = hessian_trace(net, F.cross_entropy, (x, y), n_samples=300, seed=0)
    assert abs(r.estimate - exact) < 4 * r.stderr, (r.estimate, exact, r.stderr)
    assert r.stderr < 0.2 * abs(exact)


def test_param_filter_gives_sub_block() -> None:
    net = _tiny()
    x, y = _data()
    names = ["2.weight", "2.bias"]
    h = _dense_hessian(net, x, y, names)
    lam = torch.linalg.eigvalsh(h).flip(0)
    r = hessian_eigenvalues(net, F.cross_entropy, (x, y), k=2, params=names)
    torch.testing.assert_close(torch.tensor(r.eigenvalues, dtype=DT), lam[:2], rtol=1e-6, atol=1e-9)
    r2 = hessian_eigenvalues(
        net, F.cross_entropy, (x, y), k=2, params=lambda n, p: n.startswith("2.")
    )
    assert r2.eigenvalues == pytest.approx(r.eigenvalues, rel=1e-8)
    # Hutchinson on the sub-block estimates the trace of that block only
    t = hessian_trace(net, F.cross_entropy, (x, y), n_samples=200, params=names)
    assert abs(t.estimate - float(torch.trace(h))) < 4 * t.stderr


def test_batchnorm_eval_mode_and_state_restored() -> None:
    net = _tiny(bn=True)  # in train mode with running stats
    net[0].bias.requires_grad_(False)
    x, y = _data()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    h = _dense_hessian(net, x, y)  # eval-mode Hessian (running statistics)
    r = hessian_eigenvalues(net, F.cross_entropy, (x, y), k=1)
    assert r.eigenvalues[0] == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-6)
    hessian_trace(net, F.cross_entropy, (x, y), n_samples=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, sd[k]) for k, v in net.state_dict().items())
    assert net.training and all(m.training for m in net.modules())
    assert not net[0].bias.requires_grad and net[0].weight.requires_grad


def test_state_restored_when_loss_raises() -> None:
    net = _tiny(bn=True)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    calls = {"n": 0}

    def bad(out, y):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        hessian_eigenvalues(net, bad, _data(), k=1, batch_size=10)
    assert all(torch.equal(v, sd[k]) for k, v in net.state_dict().items())
    assert net.training


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k"),
        ({"method": "arnoldi"}, "arnoldi"),
        ({"max_iter": 0}, "max_iter"),
        ({"tol": 0.0}, "tol"),
        ({"k": 10_000}, "exceeds"),
        ({"params": ["x"]}, "unknown"),
    ],
)
def test_bad_input(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        hessian_eigenvalues(_tiny(), F.cross_entropy, _data(), **kwargs)


def test_bad_vec_and_trace_samples() -> None:
    with pytest.raises(ValueError, match="entries"):
        hvp(_tiny(), F.cross_entropy, _data(), torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match="n_samples"):
        hessian_trace(_tiny(), F.cross_entropy, _data(), n_samples=0)
