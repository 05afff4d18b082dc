"""Coupling schedules: closed forms, scheduler contract, auto gamma0, registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import flatminima.optim as fo
from flatminima.optim import (
    ConstantGamma,
    CosineGamma,
    EntropySGD,
    ExponentialGamma,
    LinearGamma,
    Replicas,
    ReplicatedSGD,
    auto_gamma0,
    constant_gamma,
    cosine_gamma,
    exponential_gamma,
    linear_gamma,
)


def esgd(gamma: float = 0.1, groups: int = 1) -> EntropySGD:
    m = nn.Linear(3, 2)
    params = (
        [{"params": [m.weight]}, {"params": [m.bias]}][:groups] if groups > 1 else m.parameters()
    )
    return EntropySGD(params, lr=0.1, inner_steps=1, gamma=gamma)


def test_exponential_closed_form_growth_and_cap():
    f = exponential_gamma(1e-3, growth=1e4, total_steps=100)
    for t in (0, 1, 37, 100):
        assert f(t) == pytest.approx(1e-3 * 1e4 ** (t / 100), rel=1e-12)
    g = exponential_gamma(0.5, gamma1=0.1, gamma_max=2.0)
    assert g(3) == pytest.approx(0.5 * 1.1**3)
    assert g(1000) == 2.0 and g(10**9) == 2.0  # capped, no overflow
    assert exponential_gamma(0.0, gamma1=0.5)(10) == 0.0


def test_linear_cosine_constant():
    lin = linear_gamma(1.0, 3.0, 10)
    assert (lin(0), lin(5), lin(10), lin(50)) == (1.0, 2.0, 3.0, 3.0)
    cos = cosine_gamma(1.0, 3.0, 10)
    assert cos(0) == pytest.approx(1.0) and cos(5) == pytest.approx(2.0)
    assert cos(10) == pytest.approx(3.0) and cos(20) == pytest.approx(3.0)
    assert cos(2) == pytest.approx(1.0 + (1 - math.cos(math.pi * 0.2)))
    assert constant_gamma(0.3)(123) == 0.3


def test_scheduler_writes_gamma_and_round_trips():
    opt = esgd()
    sched = ExponentialGamma(opt, 1e-2, growth=100.0, total_steps=10)
    assert opt.param_groups[0]["gamma"] == pytest.approx(1e-2)
    for _ in range(4):
        sched.step()
    assert sched.get_last_gamma()[0] == pytest.approx(1e-2 * 100**0.4)
    assert opt.param_groups[0]["gamma"] == sched.get_last_gamma()[0]
    sd = sched.state_dict()
    opt2 = esgd()
    sched2 = ExponentialGamma(opt2, 1e-2, growth=100.0, total_steps=10)
    sched2.load_state_dict(sd)
    sched.step()
    sched2.step()
    assert opt2.param_groups[0]["gamma"] == opt.param_groups[0]["gamma"]
    assert sched2.last_step == 5


def test_schedulers_on_rsgd_and_per_group():
    reps = Replicas(lambda: nn.Linear(3, 2), 2, seed=0)
    opt = ReplicatedSGD(reps, lr=0.1, gamma=0.0)
    s = LinearGamma(opt, 0.0, 1.0, 4)
    s.step()
    s.step()
    assert opt.param_groups[0]["gamma"] == pytest.approx(0.5)
    CosineGamma(opt, 0.2, 0.4, 4)
    assert opt.param_groups[0]["gamma"] == pytest.approx(0.2)
    two = esgd(groups=2)
    two.param_groups[1]["gamma"] = 0.7
    ConstantGamma(two)
    assert [g["gamma"] for g in two.param_groups] == [0.1, 0.7]
    ConstantGamma(two, 0.3)
    assert [g["gamma"] for g in two.param_groups] == [0.3, 0.3]


def test_auto_gamma0_rule():
    reps = Replicas(lambda: nn.Linear(4, 3), 3, seed=0)
    msd = reps.mean_sq_distance()
    loss = 1.7
    g0 = auto_gamma0(loss, msd, ratio=0.05)
    assert g0 / 2 * msd == pytest.approx(0.05 * loss)
    # independent check of the distance on the stacked weights
    ws = torch.stack([torch.cat([p.detach().reshape(-1) for p in r.parameters()]) for r in reps])
    assert msd == pytest.approx(float((ws - ws.mean(0)).pow(2).sum(1).mean()))


@pytest.mark.parametrize(
    "call, bad",
    [
        (lambda: exponential_gamma(-1.0, gamma1=0.1), "gamma0 value: -1.0"),
        (lambda: exponential_gamma(1.0, growth=0.0, total_steps=5), "growth value: 0.0"),
        (lambda: exponential_gamma(1.0, growth=10.0, total_steps=0), "total_steps value: 0"),
        (lambda: exponential_gamma(1.0), "needs gamma1, or growth"),
        (lambda: exponential_gamma(1.0, growth=2.0, gamma1=0.1), "not both"),
        (lambda: exponential_gamma(1.0, gamma1=-0.5), "gamma1 value: -0.5"),
        (lambda: exponential_gamma(1.0, gamma1=0.1, gamma_max=-1.0), "gamma_max value: -1.0"),
        (lambda: linear_gamma(1.0, 2.0, -3), "total_steps value: -3"),
        (lambda: cosine_gamma(1.0, -2.0, 3), "gamma_final value: -2.0"),
        (lambda: constant_gamma(float("nan")), "gamma value: nan"),
        (lambda: auto_gamma0(1.0, 0.0), "mean_sq_distance value: 0.0"),
        (lambda: auto_gamma0(-1.0, 1.0), "loss value: -1.0"),
        (lambda: auto_gamma0(1.0, 1.0, ratio=0.0), "ratio value: 0.0"),
        (
            lambda: ExponentialGamma(
                torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 1.0, gamma1=0.1
            ),
            "no 'gamma'",
        ),
    ],
)
def test_bad_values(call, bad):
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        call()


def test_registry():
    assert fo.OPTIMIZERS == ("sgd", "esgd", "rsgd", "sam")
    assert set(fo.OPTIMIZER_CAPABILITIES) == set(fo.OPTIMIZERS)
    assert fo.OPTIMIZER_CAPABILITIES["rsgd"]["needs_replicas"]
    assert fo.OPTIMIZER_CAPABILITIES["esgd"]["needs_closure"]
    for name in fo.__all__:
        assert hasattr(fo, name)
