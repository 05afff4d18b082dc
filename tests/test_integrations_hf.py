"""Hugging Face Trainer against a plain loop on the same batches.

Each test trains a tiny local model (an ``nn.Module`` returning ``{"loss", "logits"}``; no hub
downloads) with :class:`FlatMinimaTrainer` and with a plain loop that calls the same optimizer on
the same list of batches. The Trainer's own clipping (``max_grad_norm=0``), LR schedule
(``"constant"``), shuffling (``"sequential"`` sampler) and accumulation are off, so both run the
same float operations in the same order and the weights must be equal (``torch.equal``).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
safetensors_torch = pytest.importorskip("safetensors.torch")

from transformers import Trainer, TrainingArguments  # noqa: E402

from _integration_common import assert_same, esgd  # noqa: E402
from flatminima.integrations.hf import FlatMinimaTrainer, GammaCallback  # noqa: E402
from flatminima.optim import SAM, EntropySGD, ReplicatedModule, ReplicatedSGD  # noqa: E402
from flatminima.optim.schedules import ExponentialGamma  # noqa: E402

D, B = 6, 8


class Net(nn.Module):
    """``{"loss": mean cross-entropy, "logits"}``; counts train forwards, records eval weights."""

    def __init__(self, bn: bool = False):
        super().__init__()
        mid = [nn.BatchNorm1d(8)] if bn else []
        self.body = nn.Sequential(nn.Linear(D, 8), *mid, nn.Tanh(), nn.Linear(8, 2))
        self.calls = 0
        self.eval_weights: list[torch.Tensor] = []

    def forward(self, x, labels):
        if self.training:
            self.calls += 1
        else:
            self.eval_weights.append(self.body[0].weight.detach().clone())
        logits = self.body(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def make_net(seed: int = 0, bn: bool = False) -> Net:
    torch.manual_seed(seed)
    return Net(bn)


def make_data(n_samples: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, D, generator=g)
    y = (x @ torch.randn(D, generator=g) > 0).long()
    return x, y


def as_dataset(x, y):
    return [{"x": xi, "labels": yi} for xi, yi in zip(x, y)]


def args(tmp_path, batch: int = B, **kw) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        num_train_epochs=1,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **kw,
    )


def plain_loop(model, opt, x, y, batch: int = B, after_step=None):
    for i in range(0, len(x), batch):
        opt.zero_grad()
        model(x[i : i + batch], y[i : i + batch])["loss"].backward()
        opt.step()
        if after_step is not None:
            after_step()


def test_esgd_one_batch_per_step_matches_plain_loop(tmp_path):
    n = 8  # 2 outer steps of L = 3, then 2 Langevin steps of the third
    x, y = make_data(n * B)
    model = make_net()
    opt = esgd(model.parameters())
    scoping = GammaCallback(ExponentialGamma(opt, 0.03, gamma1=0.5))
    trainer = FlatMinimaTrainer(
        model=model,
        args=args(tmp_path),
        train_dataset=as_dataset(x, y),
        optimizers=(opt, None),
        callbacks=[scoping],
    )
    trainer.train()

    ref = make_net()
    ref_opt = esgd(ref.parameters())
    ref_scoping = ExponentialGamma(ref_opt, 0.03, gamma1=0.5)

    def outer_schedule():
        if ref_opt.inner_count == 0:
            ref_scoping.step()

    plain_loop(ref, ref_opt, x, y, after_step=outer_schedule)
    assert_same(model, ref)
    assert model.calls == n  # one fresh minibatch per Langevin step
    assert opt.grad_evals == n and opt.outer_steps == 2 and opt.inner_count == 2
    assert opt.param_groups[0]["gamma"] == ref_opt.param_groups[0]["gamma"] == 0.03 * 1.5**2

    # evaluation runs with the anchor x (mid-cycle here), the live walker comes back after
    trainer.evaluate(eval_dataset=as_dataset(*make_data(B, seed=1)))
    with ref_opt.anchor_weights():
        anchor = ref.body[0].weight.detach().clone()
    assert len(model.eval_weights) == 1 and torch.equal(model.eval_weights[0], anchor)
    assert not torch.equal(anchor, model.body[0].weight)
    assert_same(model, ref)

    # save_model() by the user exports the anchor too; training state untouched
    trainer.save_model(str(tmp_path / "export"))
    saved = safetensors_torch.load_file(str(tmp_path / "export" / "model.safetensors"))
    assert torch.equal(saved["body.0.weight"], anchor)
    assert_same(model, ref)


def test_esgd_closure_form_is_refused(tmp_path):
    x, y = make_data(2 * B)
    model = make_net()
    opt = EntropySGD(model.parameters(), lr=0.1, inner_steps=3, gamma=0.1)
    trainer = FlatMinimaTrainer(
        model=model, args=args(tmp_path), train_dataset=as_dataset(x, y), optimizers=(opt, None)
    )
    with pytest.raises(ValueError, match="one_batch_per_step"):
        trainer.train()


def sam(net):
    return SAM(net.parameters(), torch.optim.SGD, rho=0.1, model=net, lr=0.2, momentum=0.9)


def test_sam_two_passes_match_plain_loop(tmp_path):
    n = 5
    x, y = make_data(n * B)
    model = make_net(bn=True)
    opt = sam(model)
    trainer = FlatMinimaTrainer(
        model=model, args=args(tmp_path), train_dataset=as_dataset(x, y), optimizers=(opt, None)
    )
    trainer.train()

    ref = make_net(bn=True)
    ref_opt = sam(ref)
    for i in range(0, len(x), B):

        def closure(i=i):
            ref_opt.zero_grad()
            loss = ref(x[i : i + B], y[i : i + B])["loss"]
            loss.backward()
            return loss

        ref_opt.step(closure)
    assert_same(model, ref)  # BatchNorm statistics included: from the first pass only
    assert model.body[1].num_batches_tracked.item() == n
    assert model.calls == 2 * n and opt.grad_evals == 2 * n


def test_base_trainer_cannot_run_sam(tmp_path):
    """Why the subclass exists: the base Trainer calls step() without a closure."""
    x, y = make_data(B)
    model = make_net()
    trainer = Trainer(
        model=model,
        args=args(tmp_path),
        train_dataset=as_dataset(x, y),
        optimizers=(sam(model), None),
    )
    with pytest.raises(TypeError, match="closure"):
        trainer.train()


def test_rsgd_replicated_module_matches_plain_loop(tmp_path):
    y_rep, n = 3, 4
    x, y = make_data(n * y_rep * B)  # each Trainer batch: y*B samples = y minibatches of B

    def rsgd(wrapper):
        return ReplicatedSGD(wrapper.replicas, lr=0.2, momentum=0.9, gamma=0.05)

    model = ReplicatedModule(make_net, y_rep, seed=0)
    opt = rsgd(model)
    scoping = GammaCallback(ExponentialGamma(opt, 0.05, gamma1=0.2))
    trainer = FlatMinimaTrainer(
        model=model,
        args=args(tmp_path, batch=y_rep * B),
        train_dataset=as_dataset(x, y),
        optimizers=(opt, None),
        callbacks=[scoping],
    )
    trainer.train()

    ref = ReplicatedModule(make_net, y_rep, seed=0)
    ref_opt = rsgd(ref)
    ref_scoping = ExponentialGamma(ref_opt, 0.05, gamma1=0.2)
    plain_loop(ref, ref_opt, x, y, batch=y_rep * B, after_step=ref_scoping.step)
    assert_same(model, ref)
    assert [r.calls for r in model.replicas] == [n] * y_rep
    assert opt.grad_evals == y_rep * n
    assert opt.param_groups[0]["gamma"] == pytest.approx(0.05 * 1.2**n, rel=1e-12)


def test_gamma_callback_catches_up_with_a_resumed_run():
    model = ReplicatedModule(make_net, 2, seed=0)
    opt = ReplicatedSGD(model.replicas, lr=0.1, gamma=0.05)
    cb = GammaCallback(ExponentialGamma(opt, 0.05, gamma1=1.0))
    cb.on_train_begin(None, types.SimpleNamespace(global_step=3), None)
    assert cb.gamma_scheduler.last_step == 3 and opt.param_groups[0]["gamma"] == 0.05 * 2**3
    net = make_net()
    esgd_opt = esgd(net.parameters())
    cb = GammaCallback(ExponentialGamma(esgd_opt, 0.05, gamma1=1.0))
    x, y = make_data(6 * B)
    plain_loop(net, esgd_opt, x, y)  # 2 outer steps, as in a checkpoint loaded to resume
    assert esgd_opt.outer_steps == 2 and cb.gamma_scheduler.last_step == 0
    cb.on_train_begin(None, types.SimpleNamespace(global_step=7), None)
    assert cb.gamma_scheduler.last_step == 2
    with pytest.raises(TypeError, match="GammaScheduler"):
        GammaCallback(torch.optim.lr_scheduler.StepLR(opt, 1))


def test_doctests():
    import doctest

    import flatminima.integrations.hf as hf

    result = doctest.testmod(hf)
    assert result.failed == 0 and result.attempted > 0
