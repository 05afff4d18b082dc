"""SAM: the two-call protocol, no closure, no half state (failing closures, bad groups, foreign
state dicts)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatminima.optim import SAM, EntropySGD, disable_running_stats

D = torch.float64


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(D)


def data(n: int = 20, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, 5, generator=g, dtype=D), torch.randint(0, 3, (n, 16), generator=g)


def equal_models(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


KW = dict(rho=0.1, lr=0.1, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("adaptive", [False, True])
def test_two_call_protocol_equals_step_closure(adaptive):
    """first_step / second_step (davda54's protocol) == step(closure), BatchNorm included."""
    x, y = data()
    a, b = net(), net()
    sa = SAM(a.parameters(), torch.optim.SGD, adaptive=adaptive, model=a, **KW)
    sb = SAM(b.parameters(), torch.optim.SGD, adaptive=adaptive, **KW)
    for i in range(len(x)):

        def closure(i=i):
            sa.zero_grad()
            loss = F.cross_entropy(a(x[i]), y[i])
            loss.backward()
            return loss

        la = sa.step(closure)
        lb = F.cross_entropy(b(x[i]), y[i])
        lb.backward()
        sb.first_step(zero_grad=True)
        assert all(p.grad is None for p in b.parameters())
        with disable_running_stats(b):
            F.cross_entropy(b(x[i]), y[i]).backward()
        sb.second_step(zero_grad=True)
        assert torch.equal(la, lb.detach())
        assert equal_models(a, b)
    assert sa.grad_evals == sb.grad_evals == 2 * len(x)
    assert not equal_models(a, net())


def test_step_without_closure_points_to_the_two_call_protocol():
    m = net()
    sam = SAM(m.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match=r"first_step\(zero_grad=True\).*second_step"):
        sam.step()


@pytest.mark.parametrize("failing_pass", [1, 2])
def test_failing_closure_leaves_weights_as_before(failing_pass):
    x, y = data(4)
    m = net()
    sam = SAM(m.parameters(), torch.optim.SGD, model=m, **KW)
    good = copy.deepcopy(m)
    s_good = SAM(good.parameters(), torch.optim.SGD, model=good, **KW)

    def closure_for(model, opt, i, fail_on=None):
        calls = {"n": 0}

        def closure():
            calls["n"] += 1
            opt.zero_grad()
            loss = F.cross_entropy(model(x[i]), y[i])
            loss.backward()
            if calls["n"] == fail_on:
                raise RuntimeError("data loader died")
            return loss

        return closure

    sam.step(closure_for(m, sam, 0))
    s_good.step(closure_for(good, s_good, 0))
    weights = [p.detach().clone() for p in m.parameters()]
    momentum = [sam.base_optimizer.state[p]["momentum_buffer"].clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match="data loader died"):
        sam.step(closure_for(m, sam, 1, fail_on=failing_pass))
    assert all(torch.equal(p, w) for p, w in zip(m.parameters(), weights))
    assert all(torch.equal(sam.base_optimizer.state[p]["momentum_buffer"], b)
               for p, b in zip(m.parameters(), momentum))  # fmt: skip
    assert all(not hasattr(mod, "_flatminima_saved_track_running_stats") for mod in m.modules())
    assert sam.restore() is False  # nothing half-done left to undo
    with pytest.raises(RuntimeError, match="first_step"):
        sam.second_step()
    # the first pass updated the BN statistics before failing (forward ran); copy them over so
    # the weights comparison after one more good step is about the optimizer alone
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        getattr(good[1], name).copy_(getattr(m[1], name))
    sam.step(closure_for(m, sam, 2))
    s_good.step(closure_for(good, s_good, 2))
    assert equal_models(m, good)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"lr": -1.0}, "SGD.*learning rate: -1.0"),
        ({"momentum": -0.5}, "SGD.*momentum value: -0.5"),
        ({"rho": -0.1}, "rho value: -0.1"),
        ({"rho": float("nan")}, "rho value: nan"),
    ],
)
def test_bad_param_group_is_rejected_before_appending(bad, match):
    m = net()
    sam = SAM(m[0].parameters(), torch.optim.SGD, lr=0.1)
    groups = list(sam.param_groups)
    with pytest.raises(ValueError, match=match):
        sam.add_param_group({"params": m[3].parameters(), **bad})
    assert sam.param_groups == groups and sam.base_optimizer.param_groups is sam.param_groups
    assert len(sam.param_groups) == 1
    with pytest.raises(ValueError, match=match):
        SAM([{"params": m[3].parameters(), **bad}], torch.optim.SGD, lr=0.1)
    sam.add_param_group({"params": m[3].parameters(), "lr": 0.5})
    assert len(sam.param_groups) == 2 and sam.param_groups[1]["rho"] == 0.05


def test_adam_group_validation():
    m = net()
    sam = SAM(m[0].parameters(), torch.optim.Adam, lr=1e-3)
    with pytest.raises(ValueError, match="Adam.*beta"):
        sam.add_param_group({"params": m[3].parameters(), "betas": (0.9, 1.5)})
    assert len(sam.param_groups) == 1


def test_load_state_dict_of_another_optimizer_is_refused():
    x, y = data(2)
    m = net()
    sam = SAM(m.parameters(), torch.optim.SGD, model=m, **KW)

    def closure():
        sam.zero_grad()
        loss = F.cross_entropy(m(x[0]), y[0])
        loss.backward()
        return loss

    sam.step(closure)
    before = copy.deepcopy(sam.state_dict())
    esgd = EntropySGD(m.parameters(), lr=0.1, inner_steps=2, gamma=0.1)
    sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    sam_adam = SAM(m.parameters(), torch.optim.Adam, lr=1e-3)
    for other, match in ((esgd, "entropy_sgd"), (sgd, "lacks.*rho"), (sam_adam, "lacks.*momentum")):
        with pytest.raises(ValueError, match=match):
            sam.load_state_dict(other.state_dict())
    after = sam.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert sam.base_optimizer.param_groups is sam.param_groups
    sam.load_state_dict(before)  # its own state still loads
    sam.step(closure)
