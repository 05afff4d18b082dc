"""Entropy-SGD: exact SGD limit, reference implementation, checkpoints, AMP, convergence."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatminima.optim import EntropySGD, ExponentialGamma
from flatminima.optim._reference import ReferenceEntropySGD

D = torch.float64


def make_model(dtype: torch.dtype = D, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def make_data(n_batches: int = 200, dtype: torch.dtype = D, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches, 16, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n_batches, 16), generator=g)
    return x, y


class Stream:
    """A closure factory that draws batch after batch (the same sequence for every copy)."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, data, scaler=None):
        self.model, self.opt, self.data, self.scaler, self.i = model, opt, data, scaler, 0

    def __call__(self):
        x, y = self.data
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(x[self.i % len(x)]), y[self.i % len(x)])
        self.i += 1
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


SGD_CASES = [
    dict(momentum=0.0, nesterov=False, weight_decay=0.0),
    dict(momentum=0.9, nesterov=False, weight_decay=0.0),
    dict(momentum=0.9, nesterov=True, weight_decay=5e-3),
    dict(momentum=0.5, nesterov=False, weight_decay=1e-2),
]


@pytest.mark.parametrize("sgd_kw", SGD_CASES)
@pytest.mark.parametrize("inner_lr", [0.5, 0.25])
def test_exact_limit_is_sgd_bitwise(sgd_kw, inner_lr):
    """L=1, eps=0, alpha=0, gamma=1/eta' is torch SGD, bit for bit (eta' a power of two)."""
    data = make_data(30)
    a, b = make_model(), make_model()
    oa = EntropySGD(
        a.parameters(),
        lr=0.1,
        **sgd_kw,
        inner_steps=1,
        inner_lr=inner_lr,
        noise=0.0,
        mu_decay=0.0,
        gamma=1.0 / inner_lr,
    )
    ob = torch.optim.SGD(b.parameters(), lr=0.1, **sgd_kw)
    ca, cb = Stream(a, oa, data), Stream(b, ob, data)
    for _ in range(30):
        la = oa.step(ca)
        lb = ob.step(cb)
        assert torch.equal(la, lb.detach())
        assert params_equal(a, b)
    assert oa.grad_evals == 30


def test_exact_limit_close_for_non_dyadic_inner_lr():
    data = make_data(30)
    a, b = make_model(), make_model()
    kw = dict(momentum=0.9, nesterov=True, weight_decay=1e-3)
    oa = EntropySGD(
        a.parameters(), lr=0.1, **kw, inner_steps=1, inner_lr=0.1, noise=0, mu_decay=0, gamma=10.0
    )
    ob = torch.optim.SGD(b.parameters(), lr=0.1, **kw)
    ca, cb = Stream(a, oa, data), Stream(b, ob, data)
    for _ in range(30):
        oa.step(ca)
        ob.step(cb)
    assert max_diff(a, b) < 1e-13


@pytest.mark.parametrize(
    "kw",
    [
        dict(momentum=0.9, nesterov=True, weight_decay=1e-3, scale_by_gamma=True),
        dict(momentum=0.0, nesterov=False, weight_decay=0.0, scale_by_gamma=False),
        dict(momentum=0.7, nesterov=False, weight_decay=0.0, inner_weight_decay=1e-2),
    ],
)
def test_matches_reference_with_noise_and_schedule(kw):
    """Fast kernels == literal per-tensor algorithm over 30 outer steps, gamma scheduled."""
    data = make_data(200)
    a, b = make_model(), make_model()
    common = dict(lr=0.2, inner_steps=4, inner_lr=0.1, noise=1e-2, mu_decay=0.75, gamma=0.5)
    fast = EntropySGD(a.parameters(), **common, **kw, seed=7)
    ref = ReferenceEntropySGD(list(b.parameters()), **common, **kw, seed=7)
    sched = ExponentialGamma(fast, 0.5, growth=10.0, total_steps=30)
    ca, cb = Stream(a, fast, data), Stream(b, torch.optim.SGD(b.parameters(), lr=0.0), data)
    for _ in range(30):
        ref.gamma = fast.param_groups[0]["gamma"]
        fast.step(ca)
        ref.step(cb)
        sched.step()
        assert max_diff(a, b) < 1e-11
    assert fast.param_groups[0]["gamma"] == pytest.approx(5.0)
    assert max_diff(a, make_model()) > 1e-2  # it did move


def test_phase_api_equals_step():
    data = make_data(50)
    a, b = make_model(), make_model()
    kw = dict(lr=0.1, momentum=0.9, inner_steps=3, gamma=0.3, noise=1e-3, seed=3)
    oa, ob = EntropySGD(a.parameters(), **kw), EntropySGD(b.parameters(), **kw)
    ca, cb = Stream(a, oa, data), Stream(b, ob, data)
    for _ in range(5):
        oa.step(ca)
        for _ in range(3):
            cb()
            ob.inner_step()
        assert ob.inner_count == 3
        ob.outer_step()
    assert params_equal(a, b)


def test_state_dict_lockstep_with_noise():
    data = make_data(300)
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, inner_steps=3, gamma=0.2, noise=1e-2, seed=5)
    a = make_model()
    oa = EntropySGD(a.parameters(), **kw)
    ca = Stream(a, oa, data)
    for _ in range(20):
        oa.step(ca)
    b = copy.deepcopy(a)
    ob = EntropySGD(b.parameters(), **{**kw, "seed": 999})  # the seed must come from the checkpoint
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    cb = Stream(b, ob, data)
    cb.i = ca.i
    assert ob.grad_evals == oa.grad_evals == 60
    for _ in range(20):
        oa.step(ca)
        ob.step(cb)
    assert params_equal(a, b)


def test_state_dict_mid_outer_step():
    data = make_data(50)
    kw = dict(lr=0.1, momentum=0.9, inner_steps=3, gamma=0.2, noise=1e-2, seed=5)
    a = make_model()
    oa = EntropySGD(a.parameters(), **kw)
    ca = Stream(a, oa, data)
    oa.step(ca)
    ca()
    oa.inner_step()
    b = copy.deepcopy(a)
    ob = EntropySGD(b.parameters(), **kw)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    cb = Stream(b, ob, data)
    cb.i = ca.i
    for opt, c in ((oa, ca), (ob, cb)):
        for _ in range(2):
            c()
            opt.inner_step()
        opt.outer_step()
    assert params_equal(a, b)


def test_noise_uses_own_generator_not_global_rng():
    data = make_data(10)
    a = make_model()
    opt = EntropySGD(a.parameters(), lr=0.1, inner_steps=2, gamma=0.1, noise=1e-2, seed=0)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    opt.step(Stream(a, opt, data))
    assert torch.equal(before, torch.random.get_rng_state())
    # the seed controls the noise: same seed same result, different seed different result
    outs = []
    for seed in (0, 0, 1):
        m = make_model()
        o = EntropySGD(m.parameters(), lr=0.1, inner_steps=2, gamma=0.1, noise=1e-2, seed=seed)
        o.step(Stream(m, o, data))
        outs.append(m)
    assert params_equal(outs[0], outs[1]) and not params_equal(outs[0], outs[2])


def test_per_group_gamma_honoured():
    """A group with gamma=0 (scale_by_gamma) gets G = 0: only weight decay moves it."""
    data = make_data(10)
    m = make_model()
    w0 = [p.detach().clone() for p in m[2].parameters()]
    opt = EntropySGD(
        [{"params": m[0].parameters()}, {"params": m[2].parameters(), "gamma": 0.0}],
        lr=0.1,
        inner_steps=2,
        gamma=1.0,
        noise=0.0,
    )
    opt.step(Stream(m, opt, data))
    assert all(torch.equal(p, q) for p, q in zip(m[2].parameters(), w0))
    assert not torch.equal(m[0].weight, make_model()[0].weight)


def test_grad_scaler_matches_unscaled_and_skips_on_inf():
    data = make_data(20, dtype=torch.float32)
    kw = dict(lr=0.1, momentum=0.9, inner_steps=3, gamma=0.5, noise=0.0)
    a, b = make_model(torch.float32), make_model(torch.float32)
    oa, ob = EntropySGD(a.parameters(), **kw), EntropySGD(b.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    ca, cb = Stream(a, oa, data, scaler), Stream(b, ob, data)
    for _ in range(3):
        oa.step(ca, grad_scaler=scaler)
        ob.step(cb)
    assert params_equal(a, b)  # scaling by powers of two is exact here
    assert scaler.get_scale() == 2.0**11  # grew once per step, not once per pass

    # inject an inf in the second pass of the next step
    snapshot = copy.deepcopy(a.state_dict())
    mom = [oa.state[p]["momentum_buffer"].clone() for p in a.parameters()]
    calls = {"n": 0}

    def bad_closure():
        calls["n"] += 1
        loss = ca()
        if calls["n"] == 2:
            a[0].weight.grad[0, 0] = float("inf")
        return loss

    oa.step(bad_closure, grad_scaler=scaler)
    assert all(torch.equal(snapshot[k], v) for k, v in a.state_dict().items())
    assert all(torch.equal(m, oa.state[p]["momentum_buffer"]) for m, p in zip(mom, a.parameters()))
    assert scaler.get_scale() == 2.0**10  # backed off once
    assert oa.grad_evals == 12 and oa.inner_count == 0


def test_bf16_autocast_runs():
    x, y = make_data(10, dtype=torch.float32)
    m = make_model(torch.float32)
    opt = EntropySGD(m.parameters(), lr=0.1, inner_steps=2, gamma=0.1, seed=0)

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(m(x[0]), y[0])
        loss.backward()
        return loss

    w0 = m[0].weight.detach().clone()
    loss = opt.step(closure)
    assert torch.isfinite(loss) and not torch.equal(w0, m[0].weight)


def test_quadratic_convergence():
    """E(w) = 1/2 (w - w*)^T A (w - w*): the free-energy minimum of a quadratic is w*."""
    torch.manual_seed(0)
    a_mat = torch.diag(torch.tensor([1.0, 3.0, 0.5], dtype=D))
    w_star = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    w = nn.Parameter(torch.zeros(3, dtype=D))
    opt = EntropySGD([w], lr=1.0, momentum=0.5, inner_steps=5, inner_lr=0.1, gamma=1.0, noise=0)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (w - w_star) @ a_mat @ (w - w_star)
        loss.backward()
        return loss

    for _ in range(300):
        opt.step(closure)
    assert torch.allclose(w, w_star, atol=1e-6)


def test_classification_convergence():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = EntropySGD(m.parameters(), lr=1.0, momentum=0.9, inner_steps=5, gamma=0.03, seed=0)
    state = {"i": 0}

    def closure():
        idx = torch.randint(0, 256, (32,), generator=g)
        state["i"] += 1
        opt.zero_grad()
        loss = F.cross_entropy(m(x[idx]), y[idx])
        loss.backward()
        return loss

    for _ in range(100):
        opt.step(closure)
    err = (m(x).argmax(1) != y).float().mean().item()
    assert err < 0.05


def test_missing_closure_and_misuse():
    m = make_model()
    opt = EntropySGD(m.parameters(), lr=0.1, inner_steps=2, gamma=0.1)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="inner_step"):
        opt.outer_step()


@pytest.mark.parametrize(
    "kw, bad",
    [
        (dict(inner_steps=0), "inner_steps value: 0"),
        (dict(inner_steps=2.5), "inner_steps value: 2.5"),
        (dict(lr=-0.1), "learning rate value: -0.1"),
        (dict(momentum=-0.5), "momentum value: -0.5"),
        (dict(weight_decay=-1.0), "weight_decay value: -1.0"),
        (dict(inner_lr=0.0), "inner_lr value: 0.0"),
        (dict(noise=-1e-4), "noise value: -0.0001"),
        (dict(mu_decay=1.0), "mu_decay value: 1.0"),
        (dict(gamma=-1.0), "gamma value: -1.0"),
        (dict(gamma=float("nan")), "gamma value: nan"),
        (dict(inner_weight_decay=-2.0), "inner_weight_decay value: -2.0"),
        (dict(nesterov=True, momentum=0.0), "nesterov"),
        (dict(seed="x"), "seed value: 'x'"),
    ],
)
def test_bad_values(kw, bad):
    args = dict(lr=0.1, inner_steps=2, gamma=0.1) | kw
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        EntropySGD(make_model().parameters(), **args)


def test_lr_scheduler_works():
    m = make_model()
    opt = EntropySGD(m.parameters(), lr=0.1, inner_steps=1, gamma=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(Stream(m, opt, make_data(2)))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_failing_closure_restores_anchor():
    data = make_data(5)
    m = make_model()
    opt = EntropySGD(m.parameters(), lr=0.1, inner_steps=3, gamma=0.1, noise=1e-2, seed=0)
    w0 = copy.deepcopy(m.state_dict())
    stream = Stream(m, opt, data)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return stream()

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert opt.inner_count == 0
    assert all(torch.equal(w0[k], v) for k, v in m.state_dict().items())
    opt.step(stream)  # usable afterwards
