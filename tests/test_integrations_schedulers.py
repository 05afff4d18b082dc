"""Framework-free parts of flatminima.integrations: GammaLR, evaluation weights, checks."""

from __future__ import annotations

import doctest
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

import flatminima.integrations._common as common
import flatminima.integrations.schedulers as schedulers
from _integration_common import esgd
from flatminima.integrations import (
    GammaLR,
    check_optimizer,
    eval_state_dicts,
    evaluation_weights,
    unwrap_optimizer,
)
from flatminima.optim import ReplicatedModule, ReplicatedSGD
from flatminima.optim.schedules import ExponentialGamma, LinearGamma


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(n)
    ]


def test_gamma_lr_is_an_lr_scheduler_that_leaves_lr_alone():
    net = ReplicatedModule(make_net, 2, seed=0)
    opt = ReplicatedSGD(net, lr=0.1, gamma=0.01)
    sched = GammaLR(LinearGamma(opt, 0.01, 0.05, total_steps=4))
    assert isinstance(sched, LRScheduler) and sched.unit == "step"
    gammas = []
    for _ in range(6):
        sched.step()
        gammas.append(opt.param_groups[0]["gamma"])
    assert gammas == pytest.approx([0.02, 0.03, 0.04, 0.05, 0.05, 0.05], abs=1e-15)
    assert sched.get_last_gamma() == [gammas[-1]]
    assert opt.param_groups[0]["lr"] == 0.1 and sched.get_last_lr() == [0.1]


def test_gamma_lr_follows_outer_steps_like_the_closure_form():
    """One-batch eSGD + GammaLR (auto: outer steps) == closure-form eSGD + per-step schedule."""
    data = batches(12)
    net = make_net()
    opt = esgd(net.parameters())
    sched = GammaLR(ExponentialGamma(opt, 0.03, gamma1=0.5))
    assert sched.unit == "outer"
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        sched.step()

    ref = make_net()
    ref_opt = esgd(ref.parameters(), one_batch=False)
    scoping = ExponentialGamma(ref_opt, 0.03, gamma1=0.5)
    stream = iter(data)

    def closure():
        x, y = next(stream)
        ref_opt.zero_grad()
        loss = F.cross_entropy(ref(x), y)
        loss.backward()
        return loss

    for _ in range(4):
        ref_opt.step(closure)
        scoping.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert opt.param_groups[0]["gamma"] == ref_opt.param_groups[0]["gamma"] == 0.03 * 1.5**4


def test_gamma_lr_state_dict_round_trip():
    net = ReplicatedModule(make_net, 2, seed=0)
    opt = ReplicatedSGD(net, lr=0.1, gamma=0.01)
    sched = GammaLR(ExponentialGamma(opt, 0.01, gamma1=1.0))
    for _ in range(3):
        sched.step()
    state = sched.state_dict()
    other = GammaLR(ExponentialGamma(opt, 0.01, gamma1=1.0))
    other.load_state_dict(state)
    other.step()
    assert other.gamma_scheduler.last_step == 4
    assert opt.param_groups[0]["gamma"] == pytest.approx(0.01 * 2**4, rel=1e-15)


def test_gamma_lr_bad_input():
    net = make_net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="GammaScheduler"):
        GammaLR(torch.optim.lr_scheduler.StepLR(sgd, 1))
    rep = ReplicatedModule(make_net, 2, seed=0)
    opt = ReplicatedSGD(rep, lr=0.1, gamma=0.01)
    with pytest.raises(ValueError, match="unit"):
        GammaLR(ExponentialGamma(opt, 0.01, gamma1=0.1), unit="epoch")
    with pytest.raises(ValueError, match="outer"):
        GammaLR(ExponentialGamma(opt, 0.01, gamma1=0.1), unit="outer")
    with pytest.raises(TypeError, match="epoch"):
        GammaLR(ExponentialGamma(opt, 0.01, gamma1=0.1)).step(3)


def test_evaluation_weights_puts_the_anchor_in_and_restores_the_walker():
    net = make_net()
    opt = esgd(net.parameters())
    for i, (x, y) in enumerate(batches(4)):  # one outer step + one Langevin step: mid-cycle
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        if i == 2:  # after the outer update the parameters are the new anchor x
            anchor = [p.detach().clone() for p in net.parameters()]
    assert opt.inner_count == 1
    walker = [p.detach().clone() for p in net.parameters()]
    wrapped = types.SimpleNamespace(optimizer=types.SimpleNamespace(optimizer=opt))
    assert unwrap_optimizer(wrapped) is opt
    with evaluation_weights(wrapped, torch.optim.SGD(make_net().parameters(), lr=0.1)):
        for p, a in zip(net.parameters(), anchor):
            assert torch.equal(p, a)
        state = eval_state_dicts(net, [opt])
    for p, w in zip(net.parameters(), walker):
        assert torch.equal(p, w)
    assert not torch.equal(walker[0], anchor[0])
    for (name, _), a in zip(net.named_parameters(), anchor):
        assert torch.equal(state["model"][name], a)


def test_eval_state_dicts_stores_the_centre():
    holder = nn.Module()
    holder.net = ReplicatedModule(make_net, 3, seed=0)
    state = eval_state_dicts(holder, [])
    assert set(state) == {"model", "center/net"}
    reps = list(holder.net.replicas)
    for name, value in state["center/net"].items():
        mean = torch.stack([r.state_dict()[name] for r in reps]).mean(0)
        torch.testing.assert_close(value, mean, rtol=0, atol=1e-7)


def test_check_optimizer_refuses_silently_wrong_setups():
    net = make_net()
    check_optimizer(esgd(net.parameters()), "a loop")
    with pytest.raises(ValueError, match="one_batch_per_step=True"):
        check_optimizer(esgd(net.parameters(), one_batch=False), "a loop")
    rep = ReplicatedModule(make_net, 2, seed=0)
    opt = ReplicatedSGD(rep, lr=0.1, gamma=0.01)
    check_optimizer(opt, "a loop")
    rep.double()  # new flat buffers: the optimizer would update tensors nobody uses
    with pytest.raises(ValueError, match="build the optimizer after moving"):
        check_optimizer(opt, "a loop")


def test_doctests():
    for module in (common, schedulers):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
