"""Entropy-SGD: one batch per step, anchor_weights, base optimizers, no half state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatminima.optim import SAM, EntropySGD, ExponentialGamma
from flatminima.optim._reference import ReferenceAdamW, ReferenceEntropySGD

D = torch.float64
L = 4
KW = dict(
    lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-3,
    inner_steps=L, inner_lr=0.1, noise=1e-2, mu_decay=0.75, gamma=0.5, seed=7,
)  # fmt: skip


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(D)


def make_data(n: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, 5, generator=g, dtype=D), torch.randint(0, 3, (n, 16), generator=g)


def loss_at(model: nn.Module, data, i: int) -> torch.Tensor:
    x, y = data
    return F.cross_entropy(model(x[i % len(x)]), y[i % len(x)])


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def snapshot(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


class Batches:
    """Closure drawing minibatch after minibatch (the same sequence for every copy)."""

    def __init__(self, model, opt, data):
        self.model, self.opt, self.data, self.i = model, opt, data, 0

    def __call__(self):
        self.opt.zero_grad()
        loss = loss_at(self.model, self.data, self.i)
        self.i += 1
        loss.backward()
        return loss


def plain_call(model, opt, data, i) -> None:
    """What a plain loop / HF Trainer does: backward, then step() without a closure."""
    opt.zero_grad()
    loss_at(model, data, i).backward()
    opt.step()


# ----------------------------------------------------------------------------- one batch per step
def test_one_batch_per_step_equals_closure_form_bitwise():
    """Closure form == per-batch with closure == per-batch without closure, noise, momentum,
    nesterov, weight decay and a gamma schedule writing the group after every outer step."""
    data = make_data()
    models = [make_model() for _ in range(3)]
    opts = [
        EntropySGD(models[0].parameters(), **KW),
        EntropySGD(models[1].parameters(), **KW, one_batch_per_step=True),
        EntropySGD(models[2].parameters(), **KW, one_batch_per_step=True),
    ]
    scheds = [ExponentialGamma(o, 0.5, growth=10.0, total_steps=6) for o in opts]
    full, per_closure = Batches(models[0], opts[0], data), Batches(models[1], opts[1], data)
    losses = []
    for t in range(6):
        full_loss = opts[0].step(full)
        for k in range(L):
            assert opts[1].inner_count == opts[2].inner_count == k
            losses.append(opts[1].step(per_closure).detach())
            plain_call(models[2], opts[2], data, t * L + k)
        for s in scheds:
            s.step()
        assert params_equal(models[0], models[1]) and params_equal(models[0], models[2])
        assert torch.equal(full_loss, torch.stack(losses[-L:]).mean())
    assert all(o.grad_evals == 6 * L and o.outer_steps == 6 and o.inner_count == 0 for o in opts)
    assert opts[1].param_groups[0]["gamma"] == pytest.approx(5.0)
    assert max((p - q).abs().max().item() for p, q in zip(models[0].parameters(),
               make_model().parameters())) > 1e-2  # fmt: skip


def test_walker_between_calls_and_anchor_weights():
    data = make_data()
    m = make_model()
    opt = EntropySGD(m.parameters(), **KW, one_batch_per_step=True)
    x0 = snapshot(m)
    with opt.anchor_weights():  # no open cycle: a no-op
        assert opt.holds_anchor and all(torch.equal(p, q) for p, q in zip(m.parameters(), x0))
    plain_call(m, opt, data, 0)
    plain_call(m, opt, data, 1)
    assert opt.inner_count == 2 and not opt.holds_anchor
    walker = snapshot(m)
    assert not all(torch.equal(p, q) for p, q in zip(walker, x0))  # params hold w' = x + delta
    with opt.anchor_weights():
        assert opt.holds_anchor
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), x0))
        with pytest.raises(RuntimeError, match="anchor_weights"):
            opt.step()
        with pytest.raises(RuntimeError, match="anchor_weights"):
            opt.inner_step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), walker))
    assert opt.inner_count == 2
    with pytest.raises(AttributeError):
        opt.inner_count = 0  # read-only


def test_step_without_closure_needs_the_flag():
    m = make_model()
    opt = EntropySGD(m.parameters(), lr=0.1, inner_steps=2, gamma=0.1)
    with pytest.raises(TypeError, match="one_batch_per_step=True"):
        opt.step()
    with pytest.raises(ValueError, match="one_batch_per_step value"):
        EntropySGD(m.parameters(), lr=0.1, inner_steps=2, gamma=0.1, one_batch_per_step=1)


@pytest.mark.parametrize("inside_anchor", [False, True])
def test_mid_cycle_checkpoint_resume_is_bitwise(inside_anchor):
    """Save after 2 of 4 Langevin steps (model weights w', or x when saved inside
    anchor_weights), load into fresh objects (model first), continue: == uninterrupted."""
    data = make_data()
    a = make_model()
    oa = EntropySGD(a.parameters(), **KW, one_batch_per_step=True)
    for i in range(2 * L + 2):
        plain_call(a, oa, data, i)
    if inside_anchor:
        with oa.anchor_weights():
            model_sd = copy.deepcopy(a.state_dict())
            opt_sd = copy.deepcopy(oa.state_dict())
    else:
        model_sd, opt_sd = copy.deepcopy(a.state_dict()), copy.deepcopy(oa.state_dict())
    b = make_model(seed=5)
    ob = EntropySGD(b.parameters(), **{**KW, "seed": 123}, one_batch_per_step=True)
    b.load_state_dict(model_sd)
    ob.load_state_dict(opt_sd)
    assert ob.inner_count == 2 and ob.grad_evals == 2 * L + 2 and params_equal(a, b)
    for i in range(2 * L + 2, 5 * L + 1):
        plain_call(a, oa, data, i)
        plain_call(b, ob, data, i)
        assert params_equal(a, b)
    assert oa.outer_steps == ob.outer_steps == 5


def test_failing_closure_in_one_batch_mode_changes_nothing():
    data = make_data()
    a, b = make_model(), make_model()
    oa = EntropySGD(a.parameters(), **KW, one_batch_per_step=True)
    ob = EntropySGD(b.parameters(), **KW, one_batch_per_step=True)
    for i in range(L + 1):
        plain_call(a, oa, data, i)
        plain_call(b, ob, data, i)
    before = snapshot(a)

    def bad():
        loss_at(a, data, 99).backward()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        oa.step(bad)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    assert oa.inner_count == 1 and oa.grad_evals == L + 1
    for i in range(L + 1, 3 * L):
        plain_call(a, oa, data, i)
        plain_call(b, ob, data, i)
    assert params_equal(a, b)


def test_grad_scaler_one_batch_mode_skips_a_bad_pass():
    torch.manual_seed(0)
    a = nn.Linear(4, 2)
    b = copy.deepcopy(a)
    x = torch.randn(6, 8, 4)
    kw = dict(lr=0.1, momentum=0.9, inner_steps=2, gamma=0.5, noise=0.0)
    oa = EntropySGD(a.parameters(), **kw, one_batch_per_step=True)
    ob = EntropySGD(b.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)

    def closure_a(i):
        def c():
            oa.zero_grad()
            scaler.scale(a(x[i]).pow(2).mean()).backward()

        return c

    it = iter(range(4))

    def closure_b():
        ob.zero_grad()
        b(x[next(it)]).pow(2).mean().backward()

    for i in range(4):
        oa.step(closure_a(i), grad_scaler=scaler)
    ob.step(closure_b)
    ob.step(closure_b)
    assert params_equal(a, b)  # power-of-two scaling is exact
    assert scaler.get_scale() == 2.0**12  # updated once per call
    plain_call_state = snapshot(a)

    def inf_closure():
        oa.zero_grad()
        scaler.scale(a(x[4]).pow(2).mean()).backward()
        a.weight.grad[0, 0] = float("inf")

    oa.step(inf_closure, grad_scaler=scaler)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), plain_call_state))
    assert oa.inner_count == 0 and oa.grad_evals == 5 and scaler.get_scale() == 2.0**11


# ----------------------------------------------------------------------------- base optimizers
@pytest.mark.parametrize("one_batch", [False, True])
def test_base_sgd_equals_builtin_outer_step_bitwise(one_batch):
    data = make_data()
    a, b = make_model(), make_model()
    sgd_kw = dict(momentum=0.9, nesterov=True, weight_decay=1e-3)
    inner = {k: v for k, v in KW.items() if k not in sgd_kw}
    oa = EntropySGD(a.parameters(), **KW, one_batch_per_step=one_batch)
    ob = EntropySGD(
        b.parameters(),
        **inner,
        one_batch_per_step=one_batch,
        base_optimizer=torch.optim.SGD,
        base_kwargs=sgd_kw,
    )
    assert isinstance(ob.base_optimizer, torch.optim.SGD)
    ca, cb = Batches(a, oa, data), Batches(b, ob, data)
    for _ in range(8 * (L if one_batch else 1)):
        oa.step(ca)
        ob.step(cb)
    assert oa.outer_steps == ob.outer_steps == 8
    assert params_equal(a, b)


def test_base_adamw_matches_literal_reference():
    """eSGD with an AdamW outer step == (w <- x ; AdamW step with gradient G), hand-written."""
    data = make_data(200)
    a, b = make_model(), make_model()
    inner = dict(inner_steps=3, inner_lr=0.1, noise=1e-2, mu_decay=0.75, gamma=0.5)
    adam = dict(betas=(0.8, 0.99), eps=1e-8, weight_decay=0.05)
    fast = EntropySGD(
        a.parameters(), lr=1e-2, **inner, seed=3, base_optimizer=torch.optim.AdamW, base_kwargs=adam
    )
    ref_adam = ReferenceAdamW(lr=1e-2, **adam)
    ref = ReferenceEntropySGD(
        list(b.parameters()),
        lr=0.0,
        momentum=0.0,
        nesterov=False,
        weight_decay=0.0,
        **inner,
        seed=3,
        outer_update=ref_adam.update_,
    )
    ca, cb = Batches(a, fast, data), Batches(b, torch.optim.SGD(b.parameters(), lr=0.0), data)
    for _ in range(25):
        fast.step(ca)
        ref.step(cb)
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert fast.base_optimizer.state[a[0].weight]["step"].item() == 25
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(),
               make_model().parameters())) > 1e-2  # fmt: skip


def test_base_adamw_param_groups_weight_decay_closed_form():
    """gamma = 0 gives G = 0: AdamW then only decays, w <- (1 - lr wd) x, per group."""
    data = make_data()
    m = make_model()
    decay = [m[0].weight, m[2].weight]
    no_decay = [m[0].bias, m[2].bias]
    opt = EntropySGD(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.1, inner_steps=2, gamma=0.0, noise=1e-2, seed=0,
        base_optimizer=torch.optim.AdamW, base_kwargs={"weight_decay": 0.5},
    )  # fmt: skip
    w0 = snapshot(m)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(Batches(m, opt, data))
    assert opt.param_groups[0]["weight_decay"] == 0.5 and opt.param_groups[1]["weight_decay"] == 0
    for p, w in zip(m.parameters(), w0):
        expected = w * (1.0 - 0.1 * 0.5) if any(p is q for q in decay) else w
        assert torch.equal(p, expected)
    sched.step()
    assert opt.base_optimizer.param_groups[1]["lr"] == pytest.approx(0.05)  # shared groups


def test_base_state_round_trips_mid_cycle():
    data = make_data()
    inner = {k: v for k, v in KW.items() if k not in ("momentum", "nesterov", "weight_decay")}
    kw = dict(**inner, one_batch_per_step=True, base_optimizer=torch.optim.AdamW)
    a = make_model()
    oa = EntropySGD(a.parameters(), **kw)
    for i in range(2 * L + 1):
        plain_call(a, oa, data, i)
    b = copy.deepcopy(a)
    ob = EntropySGD(b.parameters(), **kw)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    assert ob.base_optimizer.param_groups is ob.param_groups
    assert torch.equal(ob.base_optimizer.state[b[0].weight]["exp_avg"],
                       oa.base_optimizer.state[a[0].weight]["exp_avg"])  # fmt: skip
    for i in range(2 * L + 1, 4 * L):
        plain_call(a, oa, data, i)
        plain_call(b, ob, data, i)
    assert params_equal(a, b)


def test_base_misuse_errors():
    ps = list(make_model().parameters())
    with pytest.raises(ValueError, match="base_kwargs"):
        EntropySGD(
            ps, lr=0.1, momentum=0.9, inner_steps=2, gamma=0.1, base_optimizer=torch.optim.AdamW
        )
    with pytest.raises(ValueError, match="lr=0.1"):
        EntropySGD(
            ps,
            lr=0.1,
            inner_steps=2,
            gamma=0.1,
            base_optimizer=torch.optim.AdamW,
            base_kwargs={"lr": 0.5},
        )
    with pytest.raises(ValueError, match="'gamma'.*EntropySGD's own"):
        EntropySGD(
            ps,
            lr=0.1,
            inner_steps=2,
            gamma=0.1,
            base_optimizer=torch.optim.AdamW,
            base_kwargs={"gamma": 0.5},
        )
    with pytest.raises(ValueError, match="without a base_optimizer"):
        EntropySGD(ps, lr=0.1, inner_steps=2, gamma=0.1, base_kwargs={"betas": (0.9, 0.9)})
    with pytest.raises(TypeError, match="base_optimizer"):
        EntropySGD(ps, lr=0.1, inner_steps=2, gamma=0.1, base_optimizer="adamw")
    with pytest.raises(ValueError, match="AdamW.*beta"):
        EntropySGD(
            ps,
            lr=0.1,
            inner_steps=2,
            gamma=0.1,
            base_optimizer=torch.optim.AdamW,
            base_kwargs={"betas": (1.5, 0.9)},
        )


# ----------------------------------------------------------------------------- no half state
@pytest.mark.parametrize(
    "base, bad, match",
    [
        (None, {"lr": -1.0}, "learning rate value: -1.0"),
        (None, {"inner_lr": 0.0}, "inner_lr value: 0.0"),
        (None, {"mu_decay": 1.0}, "mu_decay value: 1.0"),
        (torch.optim.AdamW, {"lr": -1.0}, "AdamW.*learning rate"),
        (torch.optim.AdamW, {"betas": (0.9, 2.0)}, "AdamW.*beta"),
        (torch.optim.AdamW, {"gamma": -1.0}, "gamma value: -1.0"),
    ],
)
def test_bad_param_group_leaves_groups_unchanged(base, bad, match):
    m = make_model()
    opt = EntropySGD(m[0].parameters(), lr=0.1, inner_steps=2, gamma=0.1, base_optimizer=base)
    groups = list(opt.param_groups)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": m[2].parameters(), **bad})
    assert opt.param_groups == groups and len(opt.param_groups) == 1
    if base is not None:
        assert len(opt.base_optimizer.param_groups) == 1
    with pytest.raises(ValueError, match=match):
        EntropySGD(
            [{"params": m[2].parameters(), **bad}],
            lr=0.1,
            inner_steps=2,
            gamma=0.1,
            base_optimizer=base,
        )
    opt.add_param_group({"params": m[2].parameters(), "gamma": 0.3})  # a good one still goes in
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["gamma"] == 0.3
    opt.step(Batches(m, opt, make_data(4)))


def test_load_state_dict_of_another_optimizer_is_refused():
    m = make_model()
    data = make_data(8)
    opt = EntropySGD(m.parameters(), lr=0.1, momentum=0.9, inner_steps=2, gamma=0.1, seed=0)
    opt.step(Batches(m, opt, data))
    before = copy.deepcopy(opt.state_dict())
    sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    Batches(m, sgd, data)()
    sgd.step()
    sam = SAM(m.parameters(), torch.optim.SGD, lr=0.1)
    adam_esgd = EntropySGD(
        m.parameters(), lr=0.1, inner_steps=2, gamma=0.1, base_optimizer=torch.optim.AdamW
    )
    for other, match in (
        (sgd, "not an EntropySGD state"),
        (sam, "not an EntropySGD state"),
        (adam_esgd, "base_optimizer=AdamW"),
    ):
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(other.state_dict())
    forged = copy.deepcopy(before)
    forged["state"][0]["exp_avg"] = torch.zeros(1)
    with pytest.raises(ValueError, match="exp_avg"):
        opt.load_state_dict(forged)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][0][k], v) for k, v in before["state"][0].items()
               if isinstance(v, torch.Tensor))  # fmt: skip
    opt.step(Batches(m, opt, data))  # still usable


def test_sparse_gradient_changes_nothing():
    emb = nn.Embedding(5, 3, sparse=True).to(D)
    lin = nn.Linear(3, 1).to(D)
    opt = EntropySGD(
        [*lin.parameters(), emb.weight], lr=0.1, inner_steps=2, gamma=0.1, one_batch_per_step=True
    )
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    before = [p.detach().clone() for p in (*lin.parameters(), emb.weight)]
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip((*lin.parameters(), emb.weight), before))
    assert opt.inner_count == 0 and opt.grad_evals == 0 and not opt.state[lin.weight]


def test_replicated_sgd_state_is_refused_by_esgd_and_sam():
    from flatminima.optim import Replicas, ReplicatedSGD

    reps = Replicas(lambda: make_model(), 2, seed=0)
    rsgd = ReplicatedSGD(reps, lr=0.1, gamma=0.1)
    sd = rsgd.state_dict()
    m = make_model()
    with pytest.raises(ValueError, match="not an EntropySGD state"):
        EntropySGD(m.parameters(), lr=0.1, inner_steps=2, gamma=0.1).load_state_dict(sd)
    with pytest.raises(ValueError, match="replicated_sgd"):
        SAM(m.parameters(), torch.optim.SGD, lr=0.1).load_state_dict(sd)
