"""Replicas + ReplicatedSGD: exact limits, reference, autograd coupling, centre, BN, backends."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn as swa_update_bn

from flatminima.optim import ExponentialGamma, Replicas, ReplicatedSGD, update_bn
from flatminima.optim._reference import ReferenceReplicatedSGD

D = torch.float64


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(D)


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(D)


def data(y: int, steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, y, 16, 5, generator=g, dtype=D)
    t = torch.randint(0, 3, (steps, y, 16), generator=g)
    return x, t


def replica_step(reps: Replicas, opt: ReplicatedSGD, x: torch.Tensor, t: torch.Tensor) -> None:
    """Each replica on its own minibatch, losses summed, one backward, one step."""
    opt.zero_grad()
    out = opt.forward_all(x)
    loss = sum(F.cross_entropy(out[a], t[a]) for a in range(len(reps)))
    loss.backward()
    opt.step()


SGD_KW = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)


@pytest.mark.parametrize("factory", [mlp, bn_net])
def test_gamma_zero_is_independent_sgd_bitwise(factory):
    y, steps = 3, 15
    reps = Replicas(factory, y, seed=0)
    copies = [copy.deepcopy(r) for r in reps]
    opt = ReplicatedSGD(reps, **SGD_KW, gamma=0.0)
    sgds = [torch.optim.SGD(m.parameters(), **SGD_KW) for m in copies]
    x, t = data(y, steps)
    for s in range(steps):
        replica_step(reps, opt, x[s], t[s])
        for a in range(y):
            sgds[a].zero_grad()
            F.cross_entropy(copies[a](x[s, a]), t[s, a]).backward()
            sgds[a].step()
    for a in range(y):
        for p, q in zip(reps[a].parameters(), copies[a].parameters()):
            assert torch.equal(p, q)
        for p, q in zip(reps[a].buffers(), copies[a].buffers()):
            assert torch.equal(p, q)
    assert opt.grad_evals == y * steps


def test_one_replica_is_sgd_bitwise():
    reps = Replicas(mlp, 1, seed=0)
    single = copy.deepcopy(reps[0])
    opt = ReplicatedSGD(reps, **SGD_KW, gamma=5.0)
    sgd = torch.optim.SGD(single.parameters(), **SGD_KW)
    x, t = data(1, 10)
    for s in range(10):
        replica_step(reps, opt, x[s], t[s])
        sgd.zero_grad()
        F.cross_entropy(single(x[s, 0]), t[s, 0]).backward()
        sgd.step()
    assert all(torch.equal(p, q) for p, q in zip(reps[0].parameters(), single.parameters()))


@pytest.mark.parametrize("coupling_every", [1, 3])
@pytest.mark.parametrize(
    "kw", [SGD_KW, dict(lr=0.05, momentum=0.0, nesterov=False, weight_decay=0)]
)
def test_matches_reference_over_many_steps(coupling_every, kw):
    y, steps = 3, 32
    reps = Replicas(mlp, y, seed=0)
    ref_models = [copy.deepcopy(r) for r in reps]
    opt = ReplicatedSGD(reps, **kw, gamma=0.05, coupling_every=coupling_every)
    sched = ExponentialGamma(opt, 0.05, growth=100.0, total_steps=steps)
    ref = ReferenceReplicatedSGD(
        [list(m.parameters()) for m in ref_models], **kw, gamma=0.05, coupling_every=coupling_every
    )
    x, t = data(y, steps)
    for s in range(steps):
        ref.gamma = opt.param_groups[0]["gamma"]
        replica_step(reps, opt, x[s], t[s])
        for a in range(y):
            for p in ref_models[a].parameters():
                p.grad = None
            F.cross_entropy(ref_models[a](x[s, a]), t[s, a]).backward()
        ref.step()
        sched.step()
        for a in range(y):
            for p, q in zip(reps[a].parameters(), ref_models[a].parameters()):
                assert torch.allclose(p, q, rtol=0, atol=1e-12)
    # the coupling did pull the replicas together relative to uncoupled training
    assert opt.param_groups[0]["gamma"] == pytest.approx(5.0)


def test_coupling_gradient_equals_autograd_of_replicated_objective():
    y, gamma = 4, 0.7
    reps = Replicas(mlp, y, seed=0)
    x, t = data(y, 1)
    # autograd on sum_a E(w_a) + gamma/2 sum_a ||w_a - mean||^2, the mean NOT detached
    names = [n for n, _ in reps[0].named_parameters()]
    leaves = {n: torch.stack([dict(r.named_parameters())[n].detach() for r in reps]) for n in names}
    for v in leaves.values():
        v.requires_grad_(True)
    total = 0.0
    for a in range(y):
        out = torch.func.functional_call(reps[0], {n: leaves[n][a] for n in names}, (x[0, a],))
        total = total + F.cross_entropy(out, t[0, a])
    for v in leaves.values():
        total = total + gamma / 2 * (v - v.mean(0, keepdim=True)).pow(2).sum()
    grads = torch.autograd.grad(total, [leaves[n] for n in names])
    # the optimizer's coupled gradient, read off a plain step with lr=1: G = w_old - w_new
    opt = ReplicatedSGD(reps, lr=1.0, gamma=gamma)
    before = {n: leaves[n].detach().clone() for n in names}
    replica_step(reps, opt, x[0], t[0])
    for n, g in zip(names, grads):
        after = torch.stack([dict(r.named_parameters())[n].detach() for r in reps])
        assert torch.allclose(before[n] - after, g, rtol=1e-10, atol=1e-12)


def test_state_dict_lockstep():
    y = 3
    x, t = data(y, 40)
    reps = Replicas(bn_net, y, seed=0)
    opt = ReplicatedSGD(reps, **SGD_KW, gamma=0.1, coupling_every=3)
    for s in range(20):
        replica_step(reps, opt, x[s], t[s])
    reps2 = Replicas(bn_net, y, seed=42)
    reps2.load_state_dict(copy.deepcopy(reps.state_dict()))
    opt2 = ReplicatedSGD(reps2, lr=1.0, gamma=0.0)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.grad_evals == 60 and opt2.steps == 20
    assert opt2.param_groups[0]["coupling_every"] == 3
    for s in range(20, 40):
        replica_step(reps, opt, x[s], t[s])
        replica_step(reps2, opt2, x[s], t[s])
    for p, q in zip(reps.parameters(), reps2.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(reps.buffers(), reps2.buffers()):
        assert torch.equal(p, q)


def test_flat_views_and_zero_grad():
    reps = Replicas(mlp, 3, seed=0)
    (flat,) = reps.flat_params
    (gflat,) = reps.flat_grads
    assert flat.shape == (3, sum(p.numel() for p in reps[0].parameters()))
    w = reps[1][2].weight
    assert w.data_ptr() == flat[1].data_ptr() + (flat.shape[1] - 8 * 3 - 3) * flat.element_size()
    opt = ReplicatedSGD(reps, lr=0.1, gamma=0.0)  # plain SGD: .grad is not modified by step
    x, t = data(3, 2)
    replica_step(reps, opt, x[0], t[0])
    opt.zero_grad(set_to_none=True)
    assert reps[0][0].weight.grad is not None and float(gflat.abs().sum()) == 0.0
    reps.zero_grad()
    assert reps[0][0].weight.grad is not None
    # a user resetting one replica's grads to None is repaired at the next step
    before = flat.clone()
    reps[2].zero_grad(set_to_none=True)
    opt.zero_grad()
    out = reps.forward_all(x[1])
    sum(F.cross_entropy(out[a], t[1, a]) for a in range(3)).backward()
    assert reps[2][0].weight.grad.data_ptr() != gflat[2].data_ptr()
    g2 = reps[2][0].weight.grad.clone()
    opt.step()
    assert torch.equal(reps[2][0].weight.grad, g2)  # value kept, now a view again
    assert reps[2][0].weight.grad.data_ptr() == gflat[2].data_ptr()
    w_before = before[2, : 8 * 5].view(8, 5)
    assert torch.equal(reps[2][0].weight, w_before - 0.1 * g2)


def test_vmap_backend_equals_loop():
    y, steps = 3, 10
    x, t = data(y, steps)
    ra = Replicas(bn_net, y, seed=0)
    rb = copy.deepcopy(ra)
    oa = ReplicatedSGD(ra, **SGD_KW, gamma=0.2, backend="loop")
    ob = ReplicatedSGD(rb, **SGD_KW, gamma=0.2, backend="vmap")
    for s in range(steps):
        replica_step(ra, oa, x[s], t[s])
        replica_step(rb, ob, x[s], t[s])
    for p, q in zip(ra.parameters(), rb.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)
    for p, q in zip(ra.buffers(), rb.buffers()):
        assert torch.allclose(p.double(), q.double(), rtol=0, atol=1e-12)


def test_init_modes_and_seed():
    same = Replicas(mlp, 3, init="same", seed=0)
    (f,) = same.flat_params
    assert torch.equal(f[0], f[1]) and torch.equal(f[0], f[2])
    ind = Replicas(mlp, 3, seed=0)
    (g,) = ind.flat_params
    assert not torch.equal(g[0], g[1]) and not torch.equal(g[1], g[2])
    assert torch.equal(g, Replicas(mlp, 3, seed=0).flat_params[0])  # reproducible
    base = mlp()
    from_module = Replicas(base, 3, seed=0)
    (h,) = from_module.flat_params
    assert torch.equal(h[0], torch.cat([p.reshape(-1) for p in base.parameters()]))
    assert not torch.equal(h[0], h[1])
    assert from_module[0][0].weight.data_ptr() != base[0].weight.data_ptr()  # a copy
    state = torch.random.get_rng_state()
    Replicas(mlp, 2, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_center_with_batchnorm_and_recalibration():
    y = 3
    reps = Replicas(bn_net, y, seed=0)
    x, t = data(y, 5)
    opt = ReplicatedSGD(reps, lr=0.1, gamma=0.1)
    for s in range(4):
        replica_step(reps, opt, x[s], t[s])
    reps[1](x[4, 1])  # one extra BN update on replica 1: num_batches_tracked differ
    c = reps.center()
    for n, p in c.named_parameters():
        mean = torch.stack([dict(r.named_parameters())[n] for r in reps]).mean(0)
        assert torch.allclose(p, mean, rtol=0, atol=1e-15)
    bn_c = c[1]
    for name in ("running_mean", "running_var"):
        mean = torch.stack([getattr(r[1], name) for r in reps]).mean(0)
        assert torch.allclose(getattr(bn_c, name), mean, rtol=0, atol=1e-15)
    assert int(bn_c.num_batches_tracked) == 5
    assert reps.center() is c  # cached, refreshed

    loader = [(x[s].reshape(-1, 5), t[s].reshape(-1)) for s in range(5)]
    expected = copy.deepcopy(c)
    swa_update_bn(loader, expected)
    reps.eval()
    rc = reps.recalibrate_bn(loader)
    assert rc is c
    assert not any(m.training for m in rc.modules())  # eval mode (the replicas') restored
    other = copy.deepcopy(c)
    other.train()
    other[3].eval()  # a mixed mode must be restored module by module
    modes = {n: m.training for n, m in other.named_modules()}
    update_bn(loader, other)
    assert {n: m.training for n, m in other.named_modules()} == modes
    for b1, b2, b3 in zip(other.buffers(), expected.buffers(), rc.buffers()):
        assert torch.equal(b1, b2) and torch.equal(b3, b2)
    for b1, b2 in zip(rc.buffers(), expected.buffers()):
        assert torch.allclose(b1.double(), b2.double(), rtol=1e-12, atol=1e-14)


def test_ensemble_probs_and_mean_sq_distance():
    reps = Replicas(mlp, 3, seed=0)
    x = torch.randn(4, 5, dtype=D)
    probs = reps.ensemble_probs(x)
    manual = sum(torch.softmax(r(x), -1) for r in reps) / 3
    assert torch.allclose(probs, manual)
    ws = torch.stack([torch.cat([p.reshape(-1) for p in r.parameters()]) for r in reps])
    msd = (ws - ws.mean(0)).pow(2).sum(1).mean()
    assert reps.mean_sq_distance() == pytest.approx(float(msd.detach()))


def test_to_reflattens():
    reps = Replicas(lambda: nn.Linear(3, 2), 2, seed=0)
    reps.double()
    (f,) = reps.flat_params
    assert f.dtype == D and reps[1].weight.data_ptr() == f[1].data_ptr()
    assert reps[1].weight.grad.data_ptr() == reps.flat_grads[0][1].data_ptr()


def test_quadratic_and_classification_convergence():
    # quadratic E(w) = 1/2 ||w - w*||^2 for every replica: all replicas and the centre go to w*
    w_star = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    reps = Replicas(lambda: nn.Linear(3, 1, bias=False).to(D), 3, seed=0)
    opt = ReplicatedSGD(reps, lr=0.1, momentum=0.5, gamma=0.5)
    for _ in range(200):
        opt.zero_grad()
        sum(0.5 * (r.weight[0] - w_star).pow(2).sum() for r in reps).backward()
        opt.step()
    assert torch.allclose(reps.center().weight[0], w_star, atol=1e-8)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g)
    y = (x[:, 0] - 0.7 * x[:, 1] > 0).long()
    reps = Replicas(lambda: nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2)), 3, seed=0)
    opt = ReplicatedSGD(reps, lr=0.5, momentum=0.9, gamma=0.01)
    ExponentialGamma(opt, 0.01, growth=100.0, total_steps=200)
    for _ in range(200):
        idx = torch.randint(0, 256, (3, 32), generator=g)
        opt.zero_grad()
        out = reps.forward_all(x[idx])
        sum(F.cross_entropy(out[a], y[idx[a]]) for a in range(3)).backward()
        opt.step()
    err = (reps.center()(x).argmax(1) != y).float().mean().item()
    assert err < 0.05


@pytest.mark.parametrize(
    "kw, bad",
    [
        (dict(lr=-1.0), "learning rate value: -1.0"),
        (dict(momentum=-0.5), "momentum value: -0.5"),
        (dict(weight_decay=-1.0), "weight_decay value: -1.0"),
        (dict(gamma=-0.1), "gamma value: -0.1"),
        (dict(coupling_every=0), "coupling_every value: 0"),
        (dict(backend="jax"), "backend value: 'jax'"),
        (dict(nesterov=True), "nesterov"),
    ],
)
def test_bad_values(kw, bad):
    reps = Replicas(mlp, 2, seed=0)
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        ReplicatedSGD(reps, **(dict(lr=0.1, gamma=0.1) | kw))


@pytest.mark.parametrize(
    "args, kw, bad",
    [
        ((0,), {}, "num_replicas value: 0"),
        ((2,), dict(init="random"), "init value: 'random'"),
        ((2,), dict(seed=1.5), "seed value: 1.5"),
    ],
)
def test_bad_replicas_values(args, kw, bad):
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        Replicas(mlp, *args, **kw)


def test_needs_replicas_and_input_count():
    with pytest.raises(TypeError, match="Replicas"):
        ReplicatedSGD(mlp(), lr=0.1, gamma=0.1)  # type: ignore[arg-type]
    reps = Replicas(mlp, 2, seed=0)
    with pytest.raises(ValueError, match="expected 2 inputs"):
        reps.forward_all(torch.zeros(3, 4, 5, dtype=D))


def test_standard_grad_scaler_usage_and_inf_skip():
    """rSGD is a one-pass optimizer: torch's own GradScaler.step/update work on it."""
    x, t = data(2, 3)
    reps = Replicas(lambda: nn.Linear(5, 3).float(), 2, seed=0)
    ref = copy.deepcopy(reps)
    opt = ReplicatedSGD(reps, lr=0.1, momentum=0.9, gamma=0.1)
    opt_ref = ReplicatedSGD(ref, lr=0.1, momentum=0.9, gamma=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    for s in range(2):
        for r, o, sc in ((reps, opt, scaler), (ref, opt_ref, None)):
            o.zero_grad()
            out = r.forward_all(x[s].float())
            loss = sum(F.cross_entropy(out[a], t[s, a]) for a in range(2))
            if sc is None:
                loss.backward()
                o.step()
            else:
                sc.scale(loss).backward()
                sc.step(o)
                sc.update()
    assert torch.equal(reps.flat_params[0], ref.flat_params[0])
    before = reps.flat_params[0].detach().clone()
    opt.zero_grad()
    reps[1].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert torch.equal(before, reps.flat_params[0]) and scaler.get_scale() == 2.0**5
