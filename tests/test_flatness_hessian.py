"""Hessian measures against the dense Hessian of tiny models (torch.autograd.functional),
scipy's eigsh as a CPU reference, and designed spectra with known eigenvalues."""

from __future__ import annotations

import gc
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn
from torch.func import functional_call

from flatminima.flatness import hessian as hessian_mod
from flatminima.flatness import hessian_eigenvalues, hessian_trace, hvp
from flatminima.flatness.hessian import _lanczos, _power

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


def _dense_hessian(model: nn.Module, x, y, names=None, loss_fn=F.cross_entropy) -> torch.Tensor:
    """Dense Hessian of the mean loss (cross-entropy by default) w.r.t. the (selected)
    flattened parameters, model in eval mode, via torch.autograd.functional.hessian."""
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
        return loss_fn(functional_call(model, {**fixed, **ps, **buffers}, (x,)), y)

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


# ------------------------------------------------------------ thick-restart Lanczos (bounded)
def _mlp(dtype=DT) -> nn.Module:
    """5-12-4 tanh network: 124 parameters, an indefinite Hessian."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 4)).to(dtype)


def _mlp_data(n: int = 40, dtype=DT):
    g = torch.Generator().manual_seed(4)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def _signed_square(out: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (c * out.squeeze(-1) ** 2).mean()


def _designed(lams: list[float], seed: int = 0):
    """A model, loss and data whose Hessian is exactly ``Q diag(lams) Q^T``.

    ``out_i = x_i . w`` (a bias-free linear layer), ``E(w) = (1/n) sum_i c_i out_i^2`` with
    ``x_i = sqrt(n |lam_i| / 2) q_i`` and ``c_i = sign(lam_i)``: ``H = (2/n) sum_i c_i x_i x_i^T``.
    """
    d = len(lams)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    lam = torch.tensor(lams, dtype=DT)
    x = (d * lam.abs() / 2).sqrt()[:, None] * q.T
    c = torch.sign(lam)
    torch.manual_seed(seed)
    net = nn.Linear(d, 1, bias=False).double()
    return net, _signed_square, (x, c)


def _sorted(vals: torch.Tensor, which: str, k: int) -> torch.Tensor:
    key = {"LA": -vals, "SA": vals, "LM": -vals.abs()}[which]
    return vals[torch.argsort(key)][:k]


def test_restarted_lanczos_matches_dense_with_true_residuals() -> None:
    net = _mlp()
    x, y = _mlp_data()
    h = _dense_hessian(net, x, y)
    dense = torch.linalg.eigvalsh(h).flip(0)
    r = hessian_eigenvalues(net, F.cross_entropy, (x, y), k=4, ncv=9, max_iter=3000, tol=1e-9)
    assert r.converged and r.n_restarts >= 2 and r.ncv == 9  # restarts were exercised
    lam = torch.tensor(r.eigenvalues, dtype=DT)
    torch.testing.assert_close(lam, dense[:4], rtol=1e-8, atol=1e-10)
    true_res = (r.eigenvectors @ h - lam[:, None] * r.eigenvectors).norm(dim=1)
    assert (true_res <= 1e-9 * lam.abs() * 1.01 + 1e-12).all(), true_res
    torch.testing.assert_close(true_res, torch.tensor(r.residuals, dtype=DT), rtol=1e-2, atol=1e-12)
    gram = r.eigenvectors @ r.eigenvectors.T
    torch.testing.assert_close(gram, torch.eye(4, dtype=DT), rtol=0, atol=1e-8)


def test_nearly_degenerate_top_eigenvalues() -> None:
    rest = torch.linspace(-1.0, 2.0, 37, dtype=DT).tolist()
    lams = [5.0, 5.0 - 1e-6, 5.0 - 2e-6] + rest
    net, loss, data = _designed(lams)
    torch.testing.assert_close(  # the construction is right
        torch.linalg.eigvalsh(_dense_hessian(net, *data, loss_fn=loss)),
        torch.tensor(sorted(lams), dtype=DT),
        rtol=0,
        atol=1e-12,
    )
    r = hessian_eigenvalues(net, loss, data, k=3, ncv=10, max_iter=5000, tol=1e-12)
    assert r.converged
    expect = torch.tensor(lams[:3], dtype=DT)
    torch.testing.assert_close(torch.tensor(r.eigenvalues, dtype=DT), expect, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_which_largest_algebraic_smallest_and_magnitude(method) -> None:
    """Spectrum with a dominant negative eigenvalue: LA, SA and LM differ."""
    lams = [3.0, 2.0, 1.5, -8.0, -6.0] + torch.linspace(-1.0, 1.0, 19, dtype=DT).tolist()
    net, loss, data = _designed(lams, seed=1)
    lam = torch.tensor(lams, dtype=DT)
    kw = {"max_iter": 4000, "tol": 1e-12} if method == "power" else {"tol": 1e-10}
    expected = {"LA": [3.0, 2.0], "SA": [-8.0, -6.0], "LM": [-8.0, -6.0]}
    for which in ("LA", "SA", "LM"):
        r = hessian_eigenvalues(net, loss, data, k=2, method=method, which=which, **kw)
        assert r.which == which and r.converged
        got = torch.tensor(r.eigenvalues, dtype=DT)
        torch.testing.assert_close(got, _sorted(lam, which, 2), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(got, torch.tensor(expected[which], dtype=DT), rtol=1e-6, atol=0)
    r = hessian_eigenvalues(net, loss, data, k=3, method=method, which="LM", **kw)
    torch.testing.assert_close(  # third largest magnitude is the positive 3
        torch.tensor(r.eigenvalues, dtype=DT),
        torch.tensor([-8.0, -6.0, 3.0], dtype=DT),
        rtol=1e-6,
        atol=0,
    )


def test_matches_scipy_eigsh_linear_operator() -> None:
    net = _mlp()
    x, y = _mlp_data()
    d = sum(p.numel() for p in net.parameters())

    def matvec(v: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(v).reshape(-1))
        return hvp(net, F.cross_entropy, (x, y), t).numpy()

    A = LinearOperator((d, d), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(d)
    for which in ("LA", "LM"):
        ref = eigsh(A, k=4, which=which, tol=1e-12, v0=v0, return_eigenvectors=False)
        ref_t = _sorted(torch.from_numpy(ref.copy()), which, 4)
        r = hessian_eigenvalues(net, F.cross_entropy, (x, y), k=4, which=which, tol=1e-10)
        assert r.converged
        torch.testing.assert_close(
            torch.tensor(r.eigenvalues, dtype=DT), ref_t, rtol=1e-8, atol=1e-10
        )


def test_float32_basis_agrees_with_float64_and_dense() -> None:
    """A float32 model gets a float32 basis by default; it agrees with a float64 basis and with
    the dense float64 Hessian to 1e-6 of the spectral radius (measured: 2e-8; the products
    themselves are float32)."""
    net32 = _mlp(torch.float32)
    x, y = _mlp_data(dtype=torch.float32)
    net64 = _mlp(DT)
    dense = torch.linalg.eigvalsh(_dense_hessian(net64, x.double(), y)).flip(0)
    radius = float(dense.abs().max())
    kw = {"k": 3, "ncv": 10, "max_iter": 1000, "tol": 1e-5}
    r32 = hessian_eigenvalues(net32, F.cross_entropy, (x, y), **kw)
    r64 = hessian_eigenvalues(net32, F.cross_entropy, (x, y), basis_dtype=torch.float64, **kw)
    assert r32.converged and r64.converged
    assert r32.eigenvectors.dtype == torch.float32
    e32, e64 = (torch.tensor(r.eigenvalues, dtype=DT) for r in (r32, r64))
    torch.testing.assert_close(e32, e64, rtol=0, atol=1e-6 * radius)
    torch.testing.assert_close(e32, dense[:3], rtol=0, atol=1e-6 * radius)


class _Householder:
    """``A = P diag(lam) P`` with the reflection ``P = I - 2 u u^T``: products in O(D)."""

    def __init__(self, lam: torch.Tensor, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.lam = lam
        self.u = torch.randn(lam.numel(), generator=g, dtype=DT)
        self.u /= self.u.norm()
        self.calls = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        w = v.double()
        w = w - 2 * self.u * (self.u @ w)
        w = self.lam * w
        return (w - 2 * self.u * (self.u @ w)).to(v.dtype)


def test_float32_basis_on_a_large_operator() -> None:
    """D = 200k, float32 products: float32 and float64 bases give the same top-3 to 1e-6."""
    d = 200_000
    g = torch.Generator().manual_seed(5)
    lam = torch.rand(d, generator=g, dtype=DT) * 2 - 1
    lam[:3] = torch.tensor([4.0, 3.5, 3.2], dtype=DT)
    out = {}
    for dt in (torch.float32, torch.float64):
        op = _Householder(lam)
        o = _lanczos(
            lambda v, op=op: op(v.float()), d, 3, 400, 1e-6,
            torch.Generator().manual_seed(0), torch.device("cpu"), ncv=12, basis_dtype=dt,
        )  # fmt: skip
        assert o.converged
        out[dt] = o.vals
    truth = torch.tensor([4.0, 3.5, 3.2], dtype=DT)
    torch.testing.assert_close(out[torch.float32], truth, rtol=1e-6, atol=0)
    torch.testing.assert_close(out[torch.float32], out[torch.float64], rtol=1e-6, atol=0)


def _live_tensor_bytes(min_numel: int) -> int:
    """Bytes of distinct storages of live tensors with at least ``min_numel`` elements."""
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.numel() >= min_numel:
            st = obj.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def _lanczos_peak_bytes(lam: torch.Tensor, cap: int, ncv: int) -> int:
    """Peak live tensor bytes above the baseline, seen from inside every fifth product of a
    ``cap``-step run that never converges (tolerance 1e-300)."""
    d = lam.numel()
    op = _Householder(lam)
    seen = []
    gc.collect()
    # Tensors other tests left alive count in the process; only the growth above them matters.
    baseline = _live_tensor_bytes(d)

    def counted(v):
        if op.calls % 5 == 0:
            seen.append(_live_tensor_bytes(d))
        return op(v)

    o = _lanczos(
        counted, d, 2, cap, 1e-300, torch.Generator().manual_seed(0),
        torch.device("cpu"), ncv=ncv, basis_dtype=torch.float64,
    )  # fmt: skip
    assert not o.converged and op.calls == cap and o.n_iter == cap
    return max(seen) - baseline


def test_stored_vectors_do_not_grow_with_max_iter() -> None:
    """Live tensor memory during the run is the same at 30 and 100 steps, about ncv + 1
    vectors, and every step costs one product."""
    d, ncv = 3000, 8
    lam = torch.linspace(-1.0, 3.0, d, dtype=DT)
    peaks = {cap: _lanczos_peak_bytes(lam, cap, ncv) for cap in (30, 100)}
    assert peaks[100] == peaks[30], peaks
    assert peaks[30] <= (ncv + 1 + 2) * d * 8, peaks  # the basis and a vector or two


def test_progress_is_logged(caplog, monkeypatch) -> None:
    net = _mlp()
    x, y = _mlp_data()
    monkeypatch.setattr(hessian_mod, "_LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="flatminima.flatness.hessian"):
        r = hessian_eigenvalues(net, F.cross_entropy, (x, y), k=2, ncv=5, max_iter=400)
    msgs = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.INFO]
    assert r.n_restarts >= 1 and len(msgs) == r.n_restarts
    assert "restart 1" in msgs[0] and "products" in msgs[0]


def test_breakdown_finds_repeated_eigenvalue() -> None:
    """Rank-3 Hessian {2, 2, 1, 0...}: the Krylov space of one start vector is invariant after
    three steps and holds a single copy of 2; the fresh direction drawn then finds the second."""
    lams = [2.0, 2.0, 1.0] + [0.0] * 27
    net, loss, data = _designed(lams, seed=2)
    r = hessian_eigenvalues(net, loss, data, k=3, ncv=8, max_iter=200, tol=1e-10)
    assert r.converged
    torch.testing.assert_close(
        torch.tensor(r.eigenvalues, dtype=DT), torch.tensor([2.0, 2.0, 1.0], dtype=DT),
        rtol=0, atol=1e-9,
    )  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"which": "BE"}, ValueError, "which"),
        ({"ncv": 2, "k": 2}, ValueError, "ncv"),
        ({"k": 1.5}, ValueError, "k must"),
        ({"basis_dtype": torch.float16}, TypeError, "basis_dtype"),
    ],
)
def test_bad_lanczos_options(kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        hessian_eigenvalues(_tiny(), F.cross_entropy, _data(), **kwargs)
