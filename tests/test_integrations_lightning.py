"""Lightning (automatic optimization) against a plain loop on the same batches.

Every test trains a tiny network twice, once with ``lightning.Trainer`` (clipping, schedulers
other than the ones under test, shuffling and accumulation off) and once with a plain loop that
calls the same optimizer on the same list of batches, and compares the weights. Both run the
same float operations in the same order on the CPU, so the weights are required to be equal
(``torch.equal``); the only tolerance is in the rSGD check against the per-replica reference
loop, which sums the gradient in a different order (relative 1e-5).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from _integration_common import assert_same, esgd  # noqa: E402
from flatminima.integrations import GammaLR  # noqa: E402
from flatminima.integrations.lightning import CHECKPOINT_KEY, FlatMinimaCallback  # noqa: E402
from flatminima.optim import (  # noqa: E402
    SAM,
    EntropySGD,
    Replicas,
    ReplicatedModule,
    ReplicatedSGD,
)
from flatminima.optim.schedules import ExponentialGamma  # noqa: E402

D, B = 6, 8


def make_data(n_batches: int, batch: int = B, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch, D, generator=g)
    y = (x @ torch.randn(D, generator=g) > 0).long()
    return x, y


def batches_of(x, y, batch: int = B):
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def make_net(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    mid = [nn.BatchNorm1d(8)] if bn else []
    return nn.Sequential(nn.Linear(D, 8), *mid, nn.Tanh(), nn.Linear(8, 2))


class Module(pl.LightningModule):
    """Cross-entropy on ``self.net``; counts training_step calls."""

    def __init__(self, net, make_opt, make_sched=None):
        super().__init__()
        self.net = net
        self.make_opt = make_opt
        self.make_sched = make_sched
        self.calls = 0
        self.val_weights: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = self.make_opt(self)
        self.opt = opt
        if self.make_sched is None:
            return opt
        sched = self.make_sched(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ProbeModule(Module):
    """Records the weights the validation loop sees."""

    def validation_step(self, batch, batch_idx):
        self.val_weights.append({k: v.clone() for k, v in self.net.state_dict().items()})


def fit(module, x, y, batch: int = B, val=None, **kwargs):
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False
    )
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[FlatMinimaCallback()],
        **kwargs,
    )
    trainer.fit(module, loader, val)
    return trainer


def test_esgd_one_batch_per_step_matches_plain_loop():
    n = 10  # 3 outer steps of L = 3, then one Langevin step of the 4th
    x, y = make_data(n)

    def sched(opt):
        return GammaLR(ExponentialGamma(opt, 0.03, gamma1=0.5))

    module = Module(make_net(), lambda m: esgd(m.net.parameters()), sched)
    fit(module, x, y)

    net = make_net()
    opt = esgd(net.parameters())
    scoping = ExponentialGamma(opt, 0.03, gamma1=0.5)
    for xb, yb in batches_of(x, y):
        opt.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        opt.step()
        if opt.inner_count == 0:  # the schedule counts outer steps
            scoping.step()
    assert_same(module.net, net)
    assert module.calls == n  # every Langevin step saw a fresh minibatch
    assert module.opt.grad_evals == n and module.opt.outer_steps == 3
    assert module.opt.inner_count == 1
    assert module.opt.param_groups[0]["gamma"] == opt.param_groups[0]["gamma"] == 0.03 * 1.5**3
    with module.opt.anchor_weights(), opt.anchor_weights():
        assert_same(module.net, net)


def test_esgd_closure_form_is_refused():
    x, y = make_data(2)
    module = Module(
        make_net(), lambda m: EntropySGD(m.net.parameters(), lr=0.1, inner_steps=3, gamma=0.1)
    )
    with pytest.raises(ValueError, match="one_batch_per_step"):
        fit(module, x, y)
    assert module.calls == 0


def test_esgd_validation_and_checkpoint_use_anchor(tmp_path):
    n = 7  # validation after 2 outer steps + 1 Langevin step: mid-cycle
    x, y = make_data(n)
    xv, yv = make_data(1, seed=1)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=B)
    module = ProbeModule(make_net(), lambda m: esgd(m.net.parameters()))
    trainer = fit(module, x, y, val=val)

    net = make_net()
    opt = esgd(net.parameters())
    for xb, yb in batches_of(x, y):
        opt.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        opt.step()
    assert opt.inner_count == 1
    with opt.anchor_weights():
        anchor = {k: v.clone() for k, v in net.state_dict().items()}
    assert len(module.val_weights) == 1
    for k, v in module.val_weights[0].items():
        assert torch.equal(v, anchor[k]), k
    assert_same(module.net, net)  # live weights w' restored after validation
    assert not torch.equal(anchor["0.weight"], net.state_dict()["0.weight"])

    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    for k, v in anchor.items():
        assert torch.equal(ckpt[CHECKPOINT_KEY]["model"][f"net.{k}"], v)
        assert torch.equal(ckpt["state_dict"][f"net.{k}"], net.state_dict()[k])


def test_sam_two_passes_match_plain_loop():
    n = 6
    x, y = make_data(n)

    def sam(m):
        return SAM(m.parameters(), torch.optim.SGD, rho=0.1, model=m, lr=0.2, momentum=0.9)

    module = Module(make_net(bn=True), lambda m: sam(m))
    fit(module, x, y)

    net = make_net(bn=True)
    opt = sam(net)
    for xb, yb in batches_of(x, y):

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            loss = F.cross_entropy(net(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)
    assert_same(module.net, net)  # BatchNorm buffers included: first pass only
    assert module.net[1].num_batches_tracked.item() == n
    assert module.calls == 2 * n and module.opt.grad_evals == 2 * n


def test_sam_refuses_gradient_accumulation():
    x, y = make_data(4)
    module = Module(make_net(), lambda m: SAM(m.parameters(), torch.optim.SGD, model=m, lr=0.1))
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        fit(module, x, y, accumulate_grad_batches=2)


def rsgd(replicas):
    return ReplicatedSGD(replicas, lr=0.2, momentum=0.9, gamma=0.05)


def test_rsgd_replicated_module_matches_plain_loop():
    y_rep, n = 3, 5
    x, y = make_data(n, batch=y_rep * B)  # one batch of y*B = y minibatches of B

    def sched(opt):
        return GammaLR(ExponentialGamma(opt, 0.05, gamma1=0.2))

    module = Module(
        ReplicatedModule(make_net, y_rep, seed=0), lambda m: rsgd(m.net.replicas), sched
    )
    fit(module, x, y, batch=y_rep * B)

    wrapper = ReplicatedModule(make_net, y_rep, seed=0)
    opt = rsgd(wrapper.replicas)
    scoping = ExponentialGamma(opt, 0.05, gamma1=0.2)
    for xb, yb in batches_of(x, y, y_rep * B):
        opt.zero_grad()
        F.cross_entropy(wrapper(xb), yb).backward()
        opt.step()
        scoping.step()
    assert_same(module.net, wrapper)
    assert module.calls == n and module.opt.grad_evals == y_rep * n
    assert module.opt.param_groups[0]["gamma"] == pytest.approx(0.05 * 1.2**n, rel=1e-12)

    # Independent reference: Replicas, replica a on chunk a of every batch, summed mean losses.
    reps = Replicas(make_net, y_rep, seed=0)
    ref = rsgd(reps)
    ref_scoping = ExponentialGamma(ref, 0.05, gamma1=0.2)
    for xb, yb in batches_of(x, y, y_rep * B):
        ref.zero_grad()
        loss = sum(
            F.cross_entropy(net(xa), ya)
            for net, xa, ya in zip(reps, xb.chunk(y_rep), yb.chunk(y_rep))
        )
        loss.backward()
        ref.step()
        ref_scoping.step()
    for a in range(y_rep):
        got = module.net.replicas[a].state_dict()
        for k, v in reps[a].state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)


def test_gamma_lr_is_accepted_where_a_plain_gamma_scheduler_is_not():
    x, y = make_data(2)
    bad = Module(
        make_net(),
        lambda m: esgd(m.net.parameters()),
        lambda opt: ExponentialGamma(opt, 0.03, gamma1=0.5),
    )
    with pytest.raises(Exception, match="LRScheduler"):
        fit(bad, x, y)


def test_doctests():
    import doctest

    import flatminima.integrations.lightning as integration

    result = doctest.testmod(integration)
    assert result.failed == 0 and result.attempted > 0


def test_adamw_base_optimizers_match_plain_loop():
    """eSGD and rSGD with an AdamW outer/base step (no weight decay on biases for rSGD)."""
    n, y_rep = 7, 2
    x, y = make_data(n)
    xr, yr = make_data(n, batch=y_rep * B)

    def esgd_adamw(params):
        return EntropySGD(
            params,
            lr=1e-2,
            inner_steps=3,
            inner_lr=0.1,
            gamma=0.03,
            noise=1e-3,
            seed=0,
            one_batch_per_step=True,
            base_optimizer=torch.optim.AdamW,
            base_kwargs={"weight_decay": 0.01},
        )

    def rsgd_adamw(wrapper):
        named = list(wrapper.replicas[0].named_parameters())
        groups = [
            {"params": [p for k, p in named if k.endswith("bias")], "weight_decay": 0.0},
            {"params": [p for k, p in named if not k.endswith("bias")]},
        ]
        return ReplicatedSGD(
            wrapper.replicas,
            lr=1e-2,
            gamma=0.05,
            param_groups=groups,
            base_optimizer=torch.optim.AdamW,
            base_kwargs={"weight_decay": 0.1},
        )

    module = Module(make_net(), lambda m: esgd_adamw(m.net.parameters()))
    fit(module, x, y)
    rmodule = Module(ReplicatedModule(make_net, y_rep, seed=0), lambda m: rsgd_adamw(m.net))
    fit(rmodule, xr, yr, batch=y_rep * B)

    net = make_net()
    opt = esgd_adamw(net.parameters())
    wrapper = ReplicatedModule(make_net, y_rep, seed=0)
    ropt = rsgd_adamw(wrapper)
    for (xb, yb), (xrb, yrb) in zip(batches_of(x, y), batches_of(xr, yr, y_rep * B)):
        for model, o, xx, yy in ((net, opt, xb, yb), (wrapper, ropt, xrb, yrb)):
            o.zero_grad()
            F.cross_entropy(model(xx), yy).backward()
            o.step()
    assert_same(module.net, net)
    assert_same(rmodule.net, wrapper)
    assert module.opt.outer_steps == 2 and rmodule.opt.grad_evals == y_rep * n
