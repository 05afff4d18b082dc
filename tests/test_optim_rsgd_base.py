"""ReplicatedSGD with a base optimizer, param groups, no half state, and the compiled update."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatminima.optim import EntropySGD, ExponentialGamma, Replicas, ReplicatedSGD
from flatminima.optim.replicated import compile_available

D = torch.float64


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(D)


def data(y: int, steps: int, seed: int = 1, dtype: torch.dtype = D):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, y, 16, 5, generator=g, dtype=dtype)
    t = torch.randint(0, 3, (steps, y, 16), generator=g)
    return x, t


def replica_step(reps: Replicas, opt: ReplicatedSGD, x: torch.Tensor, t: torch.Tensor) -> None:
    opt.zero_grad()
    out = reps.forward_all(x)
    sum(F.cross_entropy(out[a], t[a]) for a in range(len(reps))).backward()
    opt.step()


def bias_groups(reps: Replicas, **bias_opts) -> list[dict]:
    named = list(reps[0].named_parameters())
    return [
        {"params": [p for n, p in named if n.endswith("bias")], **bias_opts},
        {"params": [p for n, p in named if not n.endswith("bias")]},
    ]


def same(a: Replicas, b: Replicas) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ----------------------------------------------------------------------------- references
def adamw_reference(models, x, t, *, lr, betas, eps, wd_of, gamma, k, steps):
    """Hand-written AdamW on y coupled replicas (float64, per tensor, no torch.optim)."""
    y = len(models)
    params = [list(m.parameters()) for m in models]
    names = [n for n, _ in models[0].named_parameters()]
    m1 = [[torch.zeros_like(p) for p in ps] for ps in params]
    m2 = [[torch.zeros_like(p) for p in ps] for ps in params]
    b1, b2 = betas
    for s in range(steps):
        grads = []
        for a in range(y):
            for p in params[a]:
                p.grad = None
            F.cross_entropy(models[a](x[s, a]), t[s, a]).backward()
            grads.append([p.grad.detach().clone() for p in params[a]])
        with torch.no_grad():
            centre = [sum(params[a][i] for a in range(y)) / y for i in range(len(names))]
            for a in range(y):
                for i, p in enumerate(params[a]):
                    g = grads[a][i]
                    if s % k == 0:
                        g = g + k * gamma * (p - centre[i])
                    p.mul_(1 - lr * wd_of(names[i]))
                    m1[a][i] = b1 * m1[a][i] + (1 - b1) * g
                    m2[a][i] = b2 * m2[a][i] + (1 - b2) * g * g
                    n = s + 1
                    mhat = m1[a][i] / (1 - b1**n)
                    vhat = m2[a][i] / (1 - b2**n)
                    p.sub_(lr * mhat / (vhat.sqrt() + eps))


# ----------------------------------------------------------------------------- base optimizer
@pytest.mark.parametrize("wd", [0.0, 1e-3])
def test_base_sgd_equals_builtin(wd):
    y, steps = 3, 12
    x, t = data(y, steps)
    ra = Replicas(mlp, y, seed=0)
    rb = copy.deepcopy(ra)
    oa = ReplicatedSGD(ra, lr=0.1, momentum=0.9, nesterov=True, weight_decay=wd, gamma=0.3)
    ob = ReplicatedSGD(
        rb, lr=0.1, gamma=0.3, base_optimizer=torch.optim.SGD,
        base_kwargs=dict(momentum=0.9, nesterov=True, weight_decay=wd),
    )  # fmt: skip
    for s in range(steps):
        replica_step(ra, oa, x[s], t[s])
        replica_step(rb, ob, x[s], t[s])
    if wd == 0.0:  # same kernels in the same order: bit for bit
        assert same(ra, rb)
    else:  # built-in folds wd into the coupling kernel: one rounding apart per step
        for p, q in zip(ra.parameters(), rb.parameters()):
            assert torch.allclose(p, q, rtol=0, atol=1e-13)
    assert ob.grad_evals == oa.grad_evals == y * steps


@pytest.mark.parametrize("k", [1, 2])
def test_adamw_matches_hand_written_reference(k):
    y, steps, gamma = 3, 24, 0.5
    x, t = data(y, steps)
    reps = Replicas(mlp, y, seed=0)
    models = [copy.deepcopy(r) for r in reps]
    init = copy.deepcopy(reps[0])
    opt = ReplicatedSGD(
        reps, lr=0.01, gamma=gamma, coupling_every=k, base_optimizer=torch.optim.AdamW,
        base_kwargs=dict(betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1),
        param_groups=bias_groups(reps, weight_decay=0.0),
    )  # fmt: skip
    for s in range(steps):
        replica_step(reps, opt, x[s], t[s])
    adamw_reference(
        models, x, t, lr=0.01, betas=(0.8, 0.95), eps=1e-8, gamma=gamma, k=k, steps=steps,
        wd_of=lambda n: 0.0 if n.endswith("bias") else 0.1,
    )  # fmt: skip
    diff = max(
        float((p - q).detach().abs().max())
        for a in range(y)
        for p, q in zip(reps[a].parameters(), models[a].parameters())
    )
    assert diff <= 1e-10
    moved = max(
        float((p - q).detach().abs().max()) for p, q in zip(reps[0].parameters(), init.parameters())
    )
    assert moved > 1e-3  # the runs did move (the comparison is not vacuous)


def test_adamw_gamma_zero_is_independent_adamw():
    y, steps = 3, 15
    x, t = data(y, steps)
    reps = Replicas(mlp, y, seed=0)
    copies = [copy.deepcopy(r) for r in reps]
    kw = dict(lr=0.01, weight_decay=0.05, amsgrad=True)
    opt = ReplicatedSGD(reps, lr=0.01, gamma=0.0, base_optimizer=torch.optim.AdamW, base_kwargs=kw)
    singles = [torch.optim.AdamW(m.parameters(), **kw) for m in copies]
    for s in range(steps):
        replica_step(reps, opt, x[s], t[s])
        for a in range(y):
            singles[a].zero_grad()
            F.cross_entropy(copies[a](x[s, a]), t[s, a]).backward()
            singles[a].step()
    for a in range(y):
        for p, q in zip(reps[a].parameters(), copies[a].parameters()):
            assert torch.equal(p, q)


def test_param_groups_builtin_honour_weight_decay():
    """gamma=0: y independent torch SGD runs with the same param groups, bit for bit."""
    y, steps = 3, 10
    x, t = data(y, steps)
    reps = Replicas(mlp, y, seed=0)
    copies = [copy.deepcopy(r) for r in reps]
    opt = ReplicatedSGD(
        reps,
        lr=0.1,
        momentum=0.9,
        weight_decay=0.5,
        gamma=0.0,
        param_groups=bias_groups(reps, weight_decay=0.0, lr=0.05),
    )
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    assert opt.param_groups[0]["params"][0].shape == (y, 8 + 3)  # the biases' flat buffer
    singles = []
    for m in copies:
        named = list(m.named_parameters())
        singles.append(torch.optim.SGD([
            {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0,
             "lr": 0.05},
            {"params": [p for n, p in named if not n.endswith("bias")]},
        ], lr=0.1, momentum=0.9, weight_decay=0.5))  # fmt: skip
    for s in range(steps):
        replica_step(reps, opt, x[s], t[s])
        for a in range(y):
            singles[a].zero_grad()
            F.cross_entropy(copies[a](x[s, a]), t[s, a]).backward()
            singles[a].step()
    for a in range(y):
        for p, q in zip(reps[a].parameters(), copies[a].parameters()):
            assert torch.equal(p, q)
    # the replicas' parameters are views of the group buffers
    bias_buf = opt.param_groups[0]["params"][0]
    assert reps[2][0].bias.data_ptr() == bias_buf[2].data_ptr()


@pytest.mark.parametrize("base", [None, torch.optim.AdamW])
def test_state_dict_round_trip_with_groups(base):
    y = 3
    x, t = data(y, 20)

    def build(seed):
        reps = Replicas(mlp, y, seed=seed)
        extra = {} if base is None else dict(base_optimizer=base, base_kwargs={"eps": 1e-6})
        kw = dict(momentum=0.9) if base is None else {}
        opt = ReplicatedSGD(
            reps,
            lr=0.05,
            gamma=0.2,
            coupling_every=2,
            **kw,
            **extra,
            param_groups=bias_groups(reps, weight_decay=0.0),
        )
        return reps, opt

    ra, oa = build(0)
    sched = ExponentialGamma(oa, 0.2, growth=10.0, total_steps=20)
    for s in range(10):
        replica_step(ra, oa, x[s], t[s])
        sched.step()
    assert oa.param_groups[1]["gamma"] == oa.param_groups[0]["gamma"] > 0.2  # all groups
    rb, ob = build(7)
    rb.load_state_dict(copy.deepcopy(ra.state_dict()))
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    assert ob.steps == 10 and ob.grad_evals == 30
    if base is not None:
        assert ob.param_groups is ob.base.param_groups  # shared again after the load
    for s in range(10, 20):
        replica_step(ra, oa, x[s], t[s])
        replica_step(rb, ob, x[s], t[s])
    assert same(ra, rb)


def test_lr_scheduler_reaches_the_base_optimizer():
    reps = Replicas(mlp, 2, seed=0)
    opt = ReplicatedSGD(reps, lr=0.1, gamma=0.1, base_optimizer=torch.optim.Adam)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0)
    assert opt.base.param_groups[0]["lr"] == 0.0
    before = reps.flat_params[0].detach().clone()
    x, t = data(2, 1)
    replica_step(reps, opt, x[0], t[0])
    sched.step()
    assert torch.equal(before, reps.flat_params[0])  # lr 0: nothing moved


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(base_optimizer=torch.optim.LBFGS), ValueError, "elementwise"),
        (dict(base_optimizer="adamw"), TypeError, "base_optimizer value: 'adamw'"),
        (dict(base_optimizer=torch.optim.AdamW, momentum=0.9), ValueError, "base_kwargs"),
        (dict(base_kwargs={"betas": (0.9, 0.9)}), ValueError, "without base_optimizer"),
        (dict(fused="triton"), ValueError, "fused value: 'triton'"),
        (dict(fused="compile", base_optimizer=torch.optim.AdamW), ValueError, "built-in"),
        (dict(param_groups={"params": []}), TypeError, "list of dicts"),
    ],
)
def test_bad_base_and_fused_values(kw, err, match):
    reps = Replicas(mlp, 2, seed=0)
    with pytest.raises(err, match=match):
        ReplicatedSGD(reps, **(dict(lr=0.1, gamma=0.1) | kw))


def test_bad_param_groups_leave_layout_unchanged():
    reps = Replicas(mlp, 2, seed=0)
    flat = reps.flat_params[0]
    named = dict(reps[0].named_parameters())
    bad = [
        ([{"params": [named["0.weight"]]}], "parameters in no group"),
        ([{"params": [reps[1][0].weight]}, {"params": list(reps[0].parameters())}],
         "not a trainable parameter of replicas\\[0\\]"),
        ([{"params": list(reps[0].parameters())}, {"params": [named["0.bias"]]}],
         "more than one group"),
        (bias_groups(reps, betas=(0.9, 0.99)), "keys \\['betas'\\]"),
        (bias_groups(reps, lr=-1.0), "param group 0: Invalid learning rate value: -1.0"),
        (bias_groups(reps, gamma=-1.0), "gamma value: -1.0"),
    ]  # fmt: skip
    for groups, match in bad:
        with pytest.raises(ValueError, match=match):
            ReplicatedSGD(reps, lr=0.1, gamma=0.1, param_groups=groups)
        assert reps.flat_params[0] is flat  # no regrouping happened
    with pytest.raises(ValueError, match="Invalid learning rate"):  # the base's own check
        ReplicatedSGD(
            reps,
            lr=0.1,
            gamma=0.1,
            base_optimizer=torch.optim.AdamW,
            base_kwargs={"lr": -1.0},
            param_groups=bias_groups(reps),
        )
    assert len(reps.flat_params) == 1  # layout restored after the base optimizer failed
    with pytest.raises(ValueError, match="param group 0: Invalid beta"):  # per-group value
        ReplicatedSGD(
            reps,
            lr=0.1,
            gamma=0.1,
            base_optimizer=torch.optim.AdamW,
            param_groups=bias_groups(reps, betas=(2.0, 0.9)),
        )
    assert len(reps.flat_params) == 1


# ----------------------------------------------------------------------------- no half state
@pytest.mark.parametrize("base", [None, torch.optim.AdamW])
def test_add_param_group_validates_before_appending(base):
    reps = Replicas(mlp, 2, seed=0)
    extra = Replicas(lambda: nn.Linear(2, 2).to(D), 2, seed=0)
    opt = ReplicatedSGD(reps, lr=0.1, gamma=0.1, base_optimizer=base)
    for bad, match in [
        (dict(lr=-1.0), "learning rate"),
        (dict(eps=-1.0), "epsilon") if base else (dict(momentum=-1.0), "momentum"),
        (dict(gamma=-2.0), "gamma value: -2.0"),
        (dict(coupling_every=0), "coupling_every value: 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            opt.add_param_group({"params": extra.flat_params, **bad})
        assert len(opt.param_groups) == 1
        if base is not None:
            assert len(opt.base.param_groups) == 1
    with pytest.raises(TypeError, match="dict"):
        opt.add_param_group(extra.flat_params)  # type: ignore[arg-type]
    opt.add_param_group({"params": extra.flat_params, "gamma": 0.5})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["gamma"] == 0.5
    if base is not None:
        assert opt.base.param_groups[1] is opt.param_groups[1]


@pytest.mark.parametrize("base", [None, torch.optim.AdamW])
def test_failing_closure_leaves_everything(base):
    reps = Replicas(mlp, 2, seed=0)
    opt = ReplicatedSGD(reps, lr=0.1, gamma=0.1, base_optimizer=base)
    x, t = data(2, 2)
    replica_step(reps, opt, x[0], t[0])
    before = copy.deepcopy(opt.state_dict())
    weights = reps.flat_params[0].detach().clone()

    def closure():
        opt.zero_grad()
        out = reps.forward_all(x[1])
        sum(F.cross_entropy(out[a], t[1, a]) for a in range(2)).backward()
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):
        opt.step(closure)
    assert torch.equal(weights, reps.flat_params[0])
    assert opt.steps == 1 and opt.grad_evals == 2
    after = opt.state_dict()
    st_b = before["state"] if base is None else before["base"]["state"]
    st_a = after["state"] if base is None else after["base"]["state"]
    for key in st_b:
        for name, v in st_b[key].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(st_a[key][name]))


def test_load_state_dict_of_another_optimizer_is_refused():
    x, t = data(2, 2)
    reps = Replicas(mlp, 2, seed=0)
    opt = ReplicatedSGD(reps, lr=0.1, momentum=0.9, gamma=0.1)
    replica_step(reps, opt, x[0], t[0])
    good = copy.deepcopy(opt.state_dict())
    # a torch SGD over the very same flat buffers (same group sizes)
    sgd = torch.optim.SGD(Replicas(mlp, 2, seed=1).flat_params, lr=0.1, momentum=0.9)
    esgd = EntropySGD(mlp().parameters(), lr=0.1, inner_steps=2, gamma=0.1)
    adamw = ReplicatedSGD(
        Replicas(mlp, 2, seed=1), lr=0.1, gamma=0.1, base_optimizer=torch.optim.AdamW
    )
    wrong_shape = copy.deepcopy(good)
    wrong_shape["state"][0]["momentum_buffer"] = torch.zeros(3, 4, dtype=D)
    cases = [
        (sgd.state_dict(), "not a ReplicatedSGD state dict"),
        (esgd.state_dict(), "not a ReplicatedSGD state dict.*entropy_sgd"),
        (adamw.state_dict(), "base optimizer AdamW, this one has None"),
        (wrong_shape, "does not fit a flat buffer"),
    ]
    for sd, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
        assert opt.steps == 1 and opt.param_groups[0]["lr"] == 0.1
    with pytest.raises(ValueError, match="this one has AdamW"):
        adamw.load_state_dict(good)
    with pytest.raises(TypeError, match="dict"):
        opt.load_state_dict([])  # type: ignore[arg-type]
    opt.load_state_dict(good)  # the real one still loads


# ----------------------------------------------------------------------------- compiled update
@pytest.mark.slow
@pytest.mark.parametrize("momentum, nesterov", [(0.9, False), (0.9, True), (0.0, False)])
def test_compiled_update_agrees(momentum, nesterov):
    if not compile_available():
        pytest.skip("torch.compile cannot run here (no C compiler / inductor)")
    y, steps = 3, 8
    f32 = lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))  # noqa: E731
    x, t = data(y, steps, dtype=torch.float32)
    ra = Replicas(f32, y, seed=0)
    rb = copy.deepcopy(ra)
    kw = dict(
        lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=1e-3, gamma=0.3, coupling_every=2
    )
    oa = ReplicatedSGD(ra, **kw)
    ob = ReplicatedSGD(rb, **kw, fused="compile")
    for s in range(steps):
        replica_step(ra, oa, x[s], t[s])
        replica_step(rb, ob, x[s], t[s])
        a, b = ra.flat_params[0].detach(), rb.flat_params[0].detach()
        assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max())
        ga, gb = ra.flat_grads[0], rb.flat_grads[0]  # both hold G (coupling + weight decay)
        assert float((ga - gb).abs().max()) <= 1e-6 * float(ga.abs().max())
        if momentum:
            ma = oa.state[ra.flat_params[0]]["momentum_buffer"]
            mb = ob.state[rb.flat_params[0]]["momentum_buffer"]
            assert float((ma - mb).abs().max()) <= 1e-6 * float(ma.abs().max())
    assert float((a - ra.flat_params[0].detach()).abs().max()) == 0.0
    assert not torch.equal(a, b)  # the compiled kernel did run (float32 rounding differs)


def test_regroup_layout_and_restore():
    reps = Replicas(mlp, 3, seed=0)
    before = [p.detach().clone() for p in reps.parameters()]
    params = list(reps.parameters())
    reps.regroup([["0.bias", "2.bias"], ["0.weight", "2.weight"]])
    assert [tuple(f.shape) for f in reps.flat_params] == [(3, 11), (3, 64)]
    assert reps.flat_groups == [[0], [1]]
    assert list(reps.parameters()) == params  # same parameter objects, now views of new buffers
    assert all(torch.equal(p, q) for p, q in zip(reps.parameters(), before))
    assert reps[1][2].bias.data_ptr() == reps.flat_params[0][1, 8:].data_ptr()
    assert reps[1][2].bias.grad.data_ptr() == reps.flat_grads[0][1, 8:].data_ptr()
    moved = copy.deepcopy(reps).double()  # re-flattening keeps the grouping
    assert [tuple(f.shape) for f in moved.flat_params] == [(3, 11), (3, 64)]
    for bad, match in [
        ([["0.bias"]], "parameters in no group"),
        ([["nope"], ["0.bias", "2.bias", "0.weight", "2.weight"]], "unknown"),
        ([["0.bias", "0.bias", "2.bias", "0.weight", "2.weight"]], "repeated"),
    ]:
        with pytest.raises(ValueError, match=match):
            reps.regroup(bad)
        assert [tuple(f.shape) for f in reps.flat_params] == [(3, 11), (3, 64)]
    reps.regroup(None)
    assert [tuple(f.shape) for f in reps.flat_params] == [(3, 75)] and reps.flat_groups == [[0]]
    assert all(torch.equal(p, q) for p, q in zip(reps.parameters(), before))
