"""SAM / ASAM: exact rho=0 limit, reference update, BatchNorm statistics, checkpoints, AMP."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatminima.optim import SAM, disable_running_stats, enable_running_stats
from flatminima.optim._reference import reference_sam_perturbation, sgd_update_

D = torch.float64


def net(dtype: torch.dtype = D, bn: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    mid = [nn.BatchNorm1d(8)] if bn else []
    return nn.Sequential(nn.Linear(5, 8), *mid, nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def data(n: int = 60, dtype: torch.dtype = D, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, 5, generator=g, dtype=dtype), torch.randint(
        0, 3, (n, 16), generator=g
    )


class Stream:
    """Closure drawing batch i on its first call of a step, the same batch on the second."""

    def __init__(self, model, opt, batches, scaler=None, calls_per_batch=2):
        self.model, self.opt, self.batches, self.scaler = model, opt, batches, scaler
        self.k, self.per = 0, calls_per_batch

    def __call__(self):
        x, y = self.batches
        i = (self.k // self.per) % len(x)
        self.k += 1
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(x[i]), y[i])
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss


def equal_models(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "base, kw",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
        (torch.optim.Adam, dict(lr=1e-2)),
    ],
)
def test_rho_zero_is_base_optimizer_bitwise(base, kw):
    batches = data()
    a, b = net(), net()
    sam = SAM(a.parameters(), base, rho=0.0, model=a, **kw)
    ref = base(b.parameters(), **kw)
    ca, cb = Stream(a, sam, batches), Stream(b, ref, batches, calls_per_batch=1)
    for _ in range(20):
        la = sam.step(ca)
        lb = ref.step(cb)
        assert torch.equal(la, lb)
    assert equal_models(a, b)  # BN statistics included: updated once per step
    assert sam.grad_evals == 40


@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_reference_over_many_steps(adaptive):
    batches = data()
    a, b = net(bn=False), net(bn=False)
    kw = dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-3)
    sam = SAM(a.parameters(), torch.optim.SGD, rho=0.1, adaptive=adaptive, **kw)
    ca = Stream(a, sam, batches)
    bufs = [None] * len(list(b.parameters()))
    x, y = batches
    for s in range(30):
        sam.step(ca)
        ps = list(b.parameters())
        for p in ps:
            p.grad = None
        F.cross_entropy(b(x[s]), y[s]).backward()
        e = reference_sam_perturbation(ps, 0.1, adaptive)
        with torch.no_grad():
            for p, ei in zip(ps, e):
                p += ei
        for p in ps:
            p.grad = None
        F.cross_entropy(b(x[s]), y[s]).backward()
        with torch.no_grad():
            for i, (p, ei) in enumerate(zip(ps, e)):
                p -= ei
                bufs[i] = sgd_update_(p, p.grad, bufs[i], **kw)
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, rtol=0, atol=1e-12)


def test_first_step_perturbation_and_exact_restore():
    m = net(bn=False)
    x, y = data(1)
    sam = SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    F.cross_entropy(m(x[0]), y[0]).backward()
    w0 = [p.detach().clone() for p in m.parameters()]
    sam.first_step()
    e = torch.cat([(p - w).reshape(-1) for p, w in zip(m.parameters(), w0)])
    g = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    assert torch.linalg.vector_norm(e).item() == pytest.approx(0.05, rel=1e-9)
    assert torch.allclose(e, 0.05 * g / g.norm(), rtol=1e-6, atol=1e-12)
    sam.restore()
    assert all(torch.equal(p, w) for p, w in zip(m.parameters(), w0))


def test_batchnorm_statistics_from_first_pass_only():
    x, y = data(1)
    a = net()
    b = copy.deepcopy(a)
    sam = SAM(a.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=a)
    sam.step(Stream(a, sam, (x, y)))
    b(x[0])  # one forward from the starting point: the expected statistics
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(a[1], name), getattr(b[1], name))
    # without model= the second pass would update them again (what we avoid)
    c = copy.deepcopy(b)
    sam_c = SAM(c.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    sam_c.step(Stream(c, sam_c, (x, y)))
    assert int(c[1].num_batches_tracked) == 3


def test_disable_running_stats_context_and_calls():
    m = net()
    x, _ = data(1)
    before = copy.deepcopy(m.state_dict())
    with disable_running_stats(m):
        out_frozen = m(x[0])
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m[1].track_running_stats
    assert torch.equal(out_frozen, copy.deepcopy(m)(x[0]))  # same batch-statistics forward
    disable_running_stats(m)
    m(x[0])
    enable_running_stats(m)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    m(x[0])
    assert int(m[1].num_batches_tracked) == 1


def test_state_dict_lockstep_with_base_state():
    batches = data(50)
    kw = dict(lr=0.05, momentum=0.9)
    a = net()
    sa = SAM(a.parameters(), torch.optim.SGD, rho=0.05, adaptive=True, model=a, **kw)
    ca = Stream(a, sa, batches)
    for _ in range(20):
        sa.step(ca)
    sd = copy.deepcopy(sa.state_dict())
    assert len(sd["state"]) == len(list(a.parameters()))  # momentum buffers are saved
    b = copy.deepcopy(a)
    sb = SAM(b.parameters(), torch.optim.SGD, rho=0.9, model=b, lr=1.0, momentum=0.9)
    sb.load_state_dict(sd)
    assert sb.param_groups[0]["rho"] == 0.05 and sb.param_groups[0]["adaptive"]
    assert sb.base_optimizer.param_groups is sb.param_groups and sb.grad_evals == 40
    cb = Stream(b, sb, batches)
    cb.k = ca.k
    for _ in range(20):
        sa.step(ca)
        sb.step(cb)
    assert equal_models(a, b)


def test_grad_scaler_matches_and_skips_on_inf():
    batches = data(10, dtype=torch.float32)
    kw = dict(lr=0.1, momentum=0.9)
    a, b = net(torch.float32, bn=False), net(torch.float32, bn=False)
    sa = SAM(a.parameters(), torch.optim.SGD, rho=0.05, **kw)
    sb = SAM(b.parameters(), torch.optim.SGD, rho=0.05, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    ca, cb = Stream(a, sa, batches, scaler), Stream(b, sb, batches)
    for _ in range(3):
        sa.step(ca, grad_scaler=scaler)
        sb.step(cb)
    assert equal_models(a, b)
    assert scaler.get_scale() == 2.0**11
    for bad_pass in (1, 2):
        snap = copy.deepcopy(a.state_dict())
        calls = {"n": 0}

        def bad(bad_pass=bad_pass, calls=calls):
            calls["n"] += 1
            loss = ca()
            if calls["n"] == bad_pass:
                a[0].bias.grad[0] = float("nan")
            return loss

        scale = scaler.get_scale()
        sa.step(bad, grad_scaler=scaler)
        assert all(torch.equal(snap[k], v) for k, v in a.state_dict().items())
        assert scaler.get_scale() == scale / 2


def test_bf16_autocast_and_lr_scheduler():
    x, y = data(2, dtype=torch.float32)
    m = net(torch.float32)
    sam = SAM(m.parameters(), torch.optim.SGD, lr=0.1, model=m)
    sched = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.5)

    def closure():
        sam.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(m(x[0]), y[0])
        loss.backward()
        return loss

    assert torch.isfinite(sam.step(closure))
    sched.step()
    assert sam.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_classification_convergence():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    sam = SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.5, momentum=0.9, model=m)
    for _ in range(150):
        idx = torch.randint(0, 256, (32,), generator=g)

        def closure(idx=idx):
            sam.zero_grad()
            loss = F.cross_entropy(m(x[idx]), y[idx])
            loss.backward()
            return loss

        sam.step(closure)
    assert (m(x).argmax(1) != y).float().mean().item() < 0.05


def test_quadratic_convergence():
    w_star = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    w = nn.Parameter(torch.zeros(3, dtype=D))
    sam = SAM([w], torch.optim.SGD, rho=0.01, lr=0.2)

    def closure():
        sam.zero_grad()
        loss = 0.5 * (w - w_star).pow(2).sum()
        loss.backward()
        return loss

    for _ in range(200):
        sam.step(closure)
    # fixed point of w <- w - lr (w + rho g/|g| - w*): |w - w*| converges to about rho
    assert (w - w_star).norm().item() < 0.02


def test_errors():
    m = net()
    with pytest.raises(ValueError, match="rho value: -0.1"):
        SAM(m.parameters(), torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="rho value: inf"):
        SAM(m.parameters(), torch.optim.SGD, rho=float("inf"), lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(m.parameters(), "sgd", lr=0.1)  # type: ignore[arg-type]
    sam = SAM(m.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        sam.step()
    with pytest.raises(RuntimeError, match="first_step"):
        sam.second_step()
