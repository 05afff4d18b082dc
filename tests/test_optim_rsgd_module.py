"""ReplicatedModule: rSGD through ``loss.backward(); opt.step()`` equals the replica loop."""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict, namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatminima.optim import Replicas, ReplicatedModule, ReplicatedSGD

D = torch.float64
KW = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, gamma=0.3)


def bn_net(dtype=D) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batches(y: int, b: int, steps: int, dtype=D):
    g = torch.Generator().manual_seed(3)
    return torch.randn(steps, y * b, 5, generator=g, dtype=dtype), torch.randint(
        0, 3, (steps, y * b), generator=g
    )


def reference_run(reps: Replicas, x, t, steps: int) -> ReplicatedSGD:
    """The existing rSGD loop: replica a on chunk a, per-replica mean losses summed."""
    y = len(reps)
    opt = ReplicatedSGD(reps, **KW)
    for s in range(steps):
        opt.zero_grad()
        xs, ts = x[s].chunk(y), t[s].chunk(y)
        out = reps.forward_all(list(xs))
        sum(F.cross_entropy(out[a], ts[a]) for a in range(y)).backward()
        opt.step()
    return opt


def wrapper_run(net: ReplicatedModule, x, t, steps: int) -> ReplicatedSGD:
    """A plain training loop: mean cross-entropy over the whole batch of y*B."""
    opt = ReplicatedSGD(net, **KW)
    for s in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x[s]), t[s]).backward()
        opt.step()
    return opt


@pytest.mark.parametrize(
    "y, b, dtype, tol",
    [
        (2, 8, D, 0.0),  # y and B powers of two: the 1/(yB) and *y scalings are exact: bitwise
        (4, 4, D, 0.0),
        (3, 8, D, 1e-13),  # y = 3: 1/(3B) * 3 rounds differently from 1/B
        (3, 8, torch.float32, 1e-6),
    ],
)
def test_plain_loop_equals_replica_loop(y, b, dtype, tol):
    steps = 10
    x, t = batches(y, b, steps, dtype)
    reps = Replicas(lambda: bn_net(dtype), y, seed=0)
    net = ReplicatedModule(copy.deepcopy(reps))
    ref_opt = reference_run(reps, x, t, steps)
    opt = wrapper_run(net, x, t, steps)
    assert opt.grad_evals == ref_opt.grad_evals == y * steps  # y minibatches of B per batch
    for p, q in zip(reps.parameters(), net.replicas.parameters()):
        if tol == 0.0:
            assert torch.equal(p, q)
        else:
            assert float((p - q).detach().abs().max()) <= tol
    for p, q in zip(reps.buffers(), net.replicas.buffers()):  # BN statistics per replica
        assert torch.allclose(p.double(), q.double(), rtol=0, atol=tol)


class LossNet(nn.Module):
    """Computes its own (mean) loss when given labels, like a Hugging Face model."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.body = nn.Linear(5, 3).to(D)
        self.kind = kind

    def forward(self, x, labels=None, *, temperature: float = 1.0, extra=None):
        logits = self.body(x) / temperature
        loss = F.cross_entropy(logits, labels)
        if self.kind == "dict":
            return OrderedDict(loss=loss, logits=logits, note="same", extra=extra["m"])
        if self.kind == "tuple":
            return loss, logits
        if self.kind == "named":
            return namedtuple("Out", "loss logits")(loss, logits)
        return Output(loss=loss, logits=logits)


@dataclasses.dataclass
class Output:
    loss: torch.Tensor
    logits: torch.Tensor
    hidden: torch.Tensor | None = None


@pytest.mark.parametrize("kind", ["dict", "tuple", "named", "dataclass"])
def test_zero_dim_losses_are_summed(kind):
    y, b = 3, 4
    x, t = batches(y, b, 1)
    reps = Replicas(lambda: LossNet(kind), y, seed=0)
    net = ReplicatedModule(copy.deepcopy(reps))
    m = torch.randn(y * b, 2, dtype=D)
    kwargs = dict(temperature=2.0, extra={"m": m}) if kind == "dict" else dict(temperature=2.0)
    out = net(x[0], labels=t[0], **kwargs)
    loss, logits = (
        (out["loss"], out["logits"])
        if kind in ("dict",)
        else ((out[0], out[1]) if kind in ("tuple", "named") else (out.loss, out.logits))
    )
    assert type(out).__name__ == {"dict": "OrderedDict", "tuple": "tuple", "named": "Out",
                                  "dataclass": "Output"}[kind]  # fmt: skip
    chunks = list(zip(x[0].chunk(y), t[0].chunk(y)))
    per = [F.cross_entropy(r.body(xa) / 2.0, ta) for r, (xa, ta) in zip(reps, chunks)]
    assert loss.dim() == 0 and torch.equal(loss, per[0] + per[1] + per[2])
    assert logits.shape == (y * b, 3)
    assert torch.equal(logits, torch.cat([r.body(xa) / 2.0 for r, (xa, _) in zip(reps, chunks)]))
    if kind == "dict":
        assert out["note"] == "same" and torch.equal(out["extra"], m)  # dict arguments split
    loss.backward()
    sum(per).backward()
    for p, q in zip(reps.parameters(), net.replicas.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_other_tensors_are_stacked_and_none_kept():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2, dtype=D))

        def forward(self, x):
            return {"per_sample": x * self.w[0], "fixed": self.w * 1.0, "none": None}

    net = ReplicatedModule(Odd, 2, seed=0)
    out = net(torch.ones(6, dtype=D))
    assert out["per_sample"].shape == (6,) and out["fixed"].shape == (2, 2) and out["none"] is None


def test_eval_mode_runs_the_refreshed_centre():
    y, b = 3, 4
    x, t = batches(y, b, 3)
    net = ReplicatedModule(bn_net, y, seed=0)
    opt = ReplicatedSGD(net, **KW)
    for s in range(2):
        opt.zero_grad()
        F.cross_entropy(net(x[s]), t[s]).backward()
        opt.step()
    net.eval()
    expected = copy.deepcopy(net.replicas).center()
    assert not expected.training
    out = net(x[2])
    assert out.shape == (y * b, 3) and torch.equal(out, expected(x[2]))
    calls = []
    real_center = net.replicas.center
    net.replicas.center = lambda: calls.append(1) or real_center()  # type: ignore[method-assign]
    net(x[2])
    assert calls == []  # nothing changed: the cached centre is reused
    net.train()
    opt.zero_grad()
    F.cross_entropy(net(x[2]), t[2]).backward()
    opt.step()
    net.eval()
    out2 = net(x[2])
    assert calls == [1]  # the replicas moved: refreshed
    del net.replicas.center
    assert torch.equal(out2, copy.deepcopy(net.replicas).center()(x[2]))
    assert not torch.equal(out, out2)


def test_bad_batch_size_and_arguments():
    net = ReplicatedModule(bn_net, 3, seed=0)
    with pytest.raises(ValueError, match=r"args\[0\] has batch size 10, which is not divisible "
                                         r"by num_replicas=3"):  # fmt: skip
        net(torch.zeros(10, 5, dtype=D))
    with pytest.raises(ValueError, match="no tensor argument"):
        net(None)
    with pytest.raises(ValueError, match="num_replicas is required"):
        ReplicatedModule(bn_net)
    reps = Replicas(bn_net, 2, seed=0)
    with pytest.raises(ValueError, match="num_replicas value: 3"):
        ReplicatedModule(reps, 3)
    with pytest.raises(ValueError, match="init and seed"):
        ReplicatedModule(reps, seed=1)
    assert ReplicatedModule(reps).replicas is reps and ReplicatedModule(reps, 2).num_replicas == 2


def test_state_dict_round_trip():
    y, b = 2, 4
    x, t = batches(y, b, 4)
    net = ReplicatedModule(bn_net, y, seed=0)
    opt = wrapper_run(net, x, t, 3)
    other = ReplicatedModule(bn_net, y, seed=5)
    other.load_state_dict(copy.deepcopy(net.state_dict()))
    opt2 = ReplicatedSGD(other, **KW)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(k.startswith("replicas.") for k in net.state_dict())
    for m in (net, other):
        o = opt if m is net else opt2
        o.zero_grad()
        F.cross_entropy(m(x[3]), t[3]).backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), other.parameters()))
    net.eval()
    other.eval()
    assert torch.equal(net(x[0]), other(x[0]))
    assert torch.equal(net(x[0]), net.center()(x[0]))


def test_hugging_face_model_output():
    """A tiny local transformers model (no download): ModelOutput combined, losses summed."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip

    def make():
        return transformers.BertForSequenceClassification(cfg).double()

    y, b = 2, 3
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (y * b, 6), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 3, (y * b,), generator=g)
    net = ReplicatedModule(make, y, seed=0)
    singles = [copy.deepcopy(r) for r in net.replicas]
    out = net(input_ids=ids, attention_mask=mask, labels=labels)
    assert type(out).__name__ == "SequenceClassifierOutput" and out.logits.shape == (y * b, 3)
    parts = [
        m(input_ids=i, attention_mask=k, labels=lab)
        for m, i, k, lab in zip(singles, ids.chunk(y), mask.chunk(y), labels.chunk(y))
    ]
    assert torch.allclose(out.loss, parts[0].loss + parts[1].loss, rtol=1e-12, atol=0)
    out.loss.backward()
    for p in parts:
        p.loss.backward()
    for a in range(y):
        for p, q in zip(net.replicas[a].parameters(), singles[a].parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-14)
