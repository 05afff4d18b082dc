"""Gradient-norm clipping (``TrainConfig.grad_clip``) in every training algorithm.

Independent truths: the unclipped run (a huge ``max_norm`` must change nothing, bit for bit),
hand-written reference loops (SGD, SAM, Replicated-SGD written out with explicit norms), the
dense per-row norm of a concatenated gradient, and the single-process run for the distributed
adapters.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.func import functional_call

from flatminima.commands.train import config_from_args
from flatminima.train import TrainConfig, build_algorithm, train
from flatminima.train.algorithms import Algorithm, clip_grad_norm_rows_

CPU = torch.device("cpu")
DIM, CLASSES, N, BATCH = 8, 3, 96, 16
HUGE = 1e9


# ---------------------------------------------------------------------------- helpers


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, CLASSES))


class Streams:
    """``next_batch(stream)``: a fixed, seeded minibatch sequence per stream.

    Stream ``s`` reads inputs scaled by ``scales[s]`` (so that replicas see gradients of very
    different norms when the scales differ).
    """

    def __init__(self, scales: tuple[float, ...] = (1.0, 1.0, 1.0)) -> None:
        gen = torch.Generator().manual_seed(7)
        self.x = torch.randn(N, DIM, generator=gen)
        teacher = torch.randn(DIM, CLASSES, generator=gen)
        self.y = (self.x @ teacher).argmax(1)
        self.scales = scales
        self.perms = [torch.randperm(N, generator=gen) for _ in scales]
        self.calls = [0] * len(scales)

    def __call__(self, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.calls[stream] % (N // BATCH)
        self.calls[stream] += 1
        idx = self.perms[stream][i * BATCH : (i + 1) * BATCH]
        return self.x[idx] * self.scales[stream], self.y[idx]


def cfg_of(optimizer: str, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        optimizer=optimizer,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-3,
        gamma=0.5 if optimizer == "rsgd" else 1e-2,
        inner_steps=3,
        inner_lr=0.1,
        noise=1e-3,
        num_replicas=3,
        rho=0.05,
        seed=0,
        progress=False,
    )
    base.update(kw)
    return TrainConfig.from_dict(base)


def build(cfg: TrainConfig) -> Algorithm:
    torch.manual_seed(cfg.seed)
    return build_algorithm(cfg, make_model, CPU)


def run_steps(
    cfg: TrainConfig, steps: int, scales: tuple[float, ...] = (1.0, 1.0, 1.0)
) -> tuple[Algorithm, list[float]]:
    algo = build(cfg)
    streams = Streams(scales)
    algo.train_mode()
    losses = [algo.step(streams) for _ in range(steps)]
    return algo, losses


def params_of(algo: Algorithm) -> list[torch.Tensor]:
    return [p.detach().clone() for p in algo.model.parameters()]


def grad_norm(params: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))


def ce(model: nn.Module, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)


def clip_by_hand(grads: list[torch.Tensor], max_norm: float) -> tuple[list[torch.Tensor], float]:
    """g * min(1, max_norm / (||g|| + 1e-6)), the norm over all tensors written out."""
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    factor = min(1.0, max_norm / (norm + 1e-6))
    return [g * factor for g in grads], norm


# ---------------------------------------------------------------------------- config and CLI


@pytest.mark.parametrize("value", [0, 0.0, -1.0, float("nan"), float("inf"), "x", True, [1.0]])
def test_config_rejects_bad_grad_clip(value: Any) -> None:
    with pytest.raises(ValueError, match="grad_clip") as info:
        TrainConfig.from_dict({"grad_clip": value})
    assert repr(value) in str(info.value)


def test_config_rejects_grad_clip_with_fp16() -> None:
    with pytest.raises(ValueError, match=r"grad_clip.*fp16.*bf16"):
        TrainConfig.from_dict({"grad_clip": 1.0, "amp": "fp16"})
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig.from_dict({"grad_clip": 1.0}).replace(amp="fp16")


def test_config_accepts_grad_clip_values() -> None:
    assert TrainConfig().grad_clip is None
    assert TrainConfig.from_dict({"grad_clip": 0.5, "amp": "bf16"}).grad_clip == 0.5
    assert TrainConfig.from_dict({"grad_clip": 2}).grad_clip == 2
    assert TrainConfig.from_dict({"grad_clip": None, "amp": "fp16"}).grad_clip is None
    assert "grad_clip" in TrainConfig.from_dict({"grad_clip": 1.0}).numerics()


def test_adapter_refuses_fp16_with_grad_clip_even_unvalidated() -> None:
    cfg = TrainConfig(amp="fp16", grad_clip=1.0)  # the dataclass constructor does not validate
    with pytest.raises(ValueError, match=r"grad_clip.*bf16"):
        build_algorithm(cfg, make_model, CPU)


def test_cli_flag_reaches_the_config() -> None:
    from flatminima.cli import build_parser

    parser = build_parser()
    cfg = config_from_args(parser.parse_args(["train", "--grad-clip", "1.0"]))
    assert cfg.grad_clip == 1.0
    assert config_from_args(parser.parse_args(["train"])).grad_clip is None
    assert config_from_args(parser.parse_args(["train", "--grad-clip", "null"])).grad_clip is None
    with pytest.raises(ValueError, match="grad_clip"):
        config_from_args(parser.parse_args(["train", "--grad-clip", "-2"]))


# ---------------------------------------------------------------------------- the row helper


def test_clip_rows_matches_dense_per_row_norms() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    scale = torch.tensor([0.01, 1.0, 10.0, 100.0], dtype=torch.float64)[:, None]
    a, b = a * scale, b * scale
    dense = torch.cat([a, b], dim=1)  # row r: replica r's whole gradient
    expect_norms = dense.norm(dim=1)
    max_norm = 3.0
    before_a, before_b = a.clone(), b.clone()
    norms = clip_grad_norm_rows_([a, b], max_norm)
    torch.testing.assert_close(norms, expect_norms)
    after = torch.cat([a, b], dim=1)
    for r in range(4):
        n = float(expect_norms[r])
        if n <= max_norm:
            assert torch.equal(a[r], before_a[r]) and torch.equal(b[r], before_b[r])
        else:
            torch.testing.assert_close(after[r], dense[r] * max_norm / (n + 1e-6))
            assert float(after[r].norm()) == pytest.approx(max_norm, rel=1e-6)
    assert int((expect_norms > max_norm).sum()) == 2  # both branches exercised


def test_clip_rows_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_rows_([torch.ones(2, 3)], 0.0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_rows_([torch.ones(2, 3)], float("nan"))
    with pytest.raises(ValueError, match="common y"):
        clip_grad_norm_rows_([torch.ones(2, 3), torch.ones(3, 3)], 1.0)


# ---------------------------------------------------------------------------- exact limit


@pytest.mark.parametrize("optimizer", ["sgd", "sam", "esgd", "rsgd"])
def test_huge_max_norm_is_bit_identical_to_no_clipping(optimizer: str) -> None:
    steps = 4
    ref, ref_losses = run_steps(cfg_of(optimizer), steps)
    big, big_losses = run_steps(cfg_of(optimizer, grad_clip=HUGE), steps)
    assert big_losses == ref_losses
    for p, q in zip(params_of(ref), params_of(big)):
        assert torch.equal(p, q)
    # ... while a small max_norm does change the run (so clipping is really applied)
    small, _ = run_steps(cfg_of(optimizer, grad_clip=1e-3), steps)
    assert any(not torch.equal(p, q) for p, q in zip(params_of(ref), params_of(small)))


# ---------------------------------------------------------------------------- references


def test_sgd_with_clipping_equals_reference_loop() -> None:
    max_norm, steps = 0.6, 6
    cfg = cfg_of("sgd", grad_clip=max_norm, nesterov=True)
    algo, _ = run_steps(cfg, steps)

    torch.manual_seed(cfg.seed)
    model = make_model()
    opt = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
        weight_decay=cfg.weight_decay,
    )
    streams = Streams()
    raw_norms = []
    for _ in range(steps):
        x, y = streams(0)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        params = list(model.parameters())
        clipped, norm = clip_by_hand([p.grad for p in params], max_norm)
        raw_norms.append(norm)
        for p, g in zip(params, clipped):
            p.grad = g
        opt.step()
    # the data and max_norm were chosen so that some steps clip and some do not
    assert min(raw_norms) < max_norm < max(raw_norms), raw_norms
    for p, q in zip(params_of(algo), model.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-7)


def test_sam_clips_both_passes_equals_reference() -> None:
    max_norm, steps, rho, lr = 0.05, 3, 0.05, 0.1
    cfg = cfg_of("sam", grad_clip=max_norm, momentum=0.0, weight_decay=0.0, rho=rho, lr=lr)
    algo, _ = run_steps(cfg, steps)

    torch.manual_seed(cfg.seed)
    model = make_model()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    streams = Streams()
    for _ in range(steps):
        batch = streams(0)
        leaves = {k: v.clone().requires_grad_(True) for k, v in w.items()}
        g1, n1 = clip_by_hand(
            list(torch.autograd.grad(ce(model, leaves, batch), list(leaves.values()))), max_norm
        )
        norm1 = math.sqrt(sum(float(g.pow(2).sum()) for g in g1))
        ascent = {k: (w[k] + rho * g / norm1).requires_grad_(True) for k, g in zip(w, g1)}
        g2, n2 = clip_by_hand(
            list(torch.autograd.grad(ce(model, ascent, batch), list(ascent.values()))), max_norm
        )
        assert n1 > max_norm and n2 > max_norm  # both passes clip
        w = {k: w[k] - lr * g for k, g in zip(w, g2)}
    for p, (name, q) in zip(params_of(algo), w.items()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def _record(fn: Any, params: list[torch.Tensor], out: list[float]) -> Any:
    def wrapper(*args: Any, **kw: Any) -> Any:
        out.append(grad_norm(params))
        return fn(*args, **kw)

    return wrapper


def test_esgd_and_sam_pass_clipped_gradients_to_every_update() -> None:
    max_norm = 1e-3  # far below every raw minibatch gradient norm here
    esgd = build(cfg_of("esgd", grad_clip=max_norm))
    params = list(esgd.model.parameters())
    seen: list[float] = []
    esgd.optimizer.inner_step = _record(esgd.optimizer.inner_step, params, seen)
    streams = Streams()
    for _ in range(2):
        esgd.step(streams)
    assert len(seen) == 2 * 3  # every inner step of both outer steps
    assert seen == pytest.approx([max_norm] * 6, rel=1e-3)

    sam = build(cfg_of("sam", grad_clip=max_norm))
    params = list(sam.model.parameters())
    first: list[float] = []
    second: list[float] = []
    sam.optimizer.first_step = _record(sam.optimizer.first_step, params, first)
    base = sam.optimizer.base_optimizer
    base.step = _record(base.step, params, second)
    streams = Streams()
    for _ in range(2):
        sam.step(streams)
    assert first == pytest.approx([max_norm] * 2, rel=1e-3)
    assert second == pytest.approx([max_norm] * 2, rel=1e-3)


def test_rsgd_clips_each_replica_separately() -> None:
    """rSGD written out by hand: per-replica clip, then coupling + weight decay + momentum."""
    max_norm, steps = 0.05, 3
    scales = (0.3, 1.0, 5.0)  # replicas see very different gradient norms
    cfg = cfg_of("rsgd", grad_clip=max_norm)
    algo = build(cfg)
    flat = algo.replicas.flat_grads
    seen: list[torch.Tensor] = []
    algo.optimizer.register_step_pre_hook(
        lambda *_: seen.append(torch.cat([g for g in flat], dim=1).norm(dim=1))
    )
    streams = Streams(scales)
    for _ in range(steps):
        algo.step(streams)
    # every replica's gradient handed to the step has norm max_norm (all raw norms exceed it)
    for norms in seen:
        torch.testing.assert_close(norms, torch.full((3,), max_norm), rtol=1e-4, atol=0.0)

    def reference(per_replica: bool) -> list[list[torch.Tensor]]:
        from flatminima.optim import Replicas

        reps = Replicas(make_model, 3, init=cfg.replica_init, seed=cfg.seed)
        model = make_model()
        names = [n for n, _ in reps[0].named_parameters()]
        ws = [[p.detach().clone() for p in r.parameters()] for r in reps]
        bufs: list[list[torch.Tensor]] | None = None
        streams = Streams(scales)
        raw: list[float] = []
        for _ in range(steps):
            grads = []
            for a in range(3):
                leaves = {n: w.clone().requires_grad_(True) for n, w in zip(names, ws[a])}
                loss = ce(model, leaves, streams(a))
                grads.append(list(torch.autograd.grad(loss, list(leaves.values()))))
            if per_replica:
                clipped = []
                for g in grads:
                    c, n = clip_by_hand(g, max_norm)
                    clipped.append(c)
                    raw.append(n)
                grads = clipped
            else:  # one joint norm over all replicas: what the brief says NOT to do
                joint, _ = clip_by_hand([t for g in grads for t in g], max_norm)
                grads = [joint[i * len(names) : (i + 1) * len(names)] for i in range(3)]
            center = [sum(ws[a][i] for a in range(3)) / 3 for i in range(len(names))]
            d = [
                [
                    g + cfg.gamma * (w - c) + cfg.weight_decay * w
                    for g, w, c in zip(grads[a], ws[a], center)
                ]
                for a in range(3)
            ]
            bufs = (
                d
                if bufs is None
                else [[cfg.momentum * b + di for b, di in zip(bufs[a], d[a])] for a in range(3)]
            )
            ws = [[w - cfg.lr * b for w, b in zip(ws[a], bufs[a])] for a in range(3)]
        if per_replica:
            assert max(raw[:3]) > 5 * min(raw[:3])  # the replica norms do differ
        return ws

    got = [list(r.parameters()) for r in algo.replicas]
    expect = reference(per_replica=True)
    for a in range(3):
        for p, q in zip(got[a], expect[a]):
            torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-7)
    joint = reference(per_replica=False)
    assert any(
        not torch.allclose(p.detach(), q, rtol=1e-4, atol=1e-6)
        for a in range(3)
        for p, q in zip(got[a], joint[a])
    )


# ---------------------------------------------------------------------------- through the loop


def _gmm_cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        data="gmm",
        data_kwargs={"num_train": 320, "num_test": 200},
        model="mlp",
        model_kwargs={"hidden": [16]},
        epochs=1,
        batch_size=32,
        lr=0.05,
        progress=False,
        train_eval_samples=100,
    )
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_trainer_records_and_applies_grad_clip(tmp_path: Path) -> None:
    plain = train(_gmm_cfg(), tmp_path / "plain")
    clipped = train(_gmm_cfg(grad_clip=1e-3), tmp_path / "clipped")
    saved = yaml.safe_load((tmp_path / "clipped" / "config.yaml").read_text())
    assert saved["grad_clip"] == 1e-3
    assert clipped["status"] == "complete"
    assert clipped["final"]["train_loss"] != plain["final"]["train_loss"]


# ---------------------------------------------------------------------------- distributed


def _dist_worker(jobs: list[tuple[TrainConfig, str]], per_replica: int = 1) -> list[Any]:
    from flatminima.distributed import train_distributed

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    out = [
        train_distributed(cfg, folder, procs_per_replica=per_replica, timeout=60)
        for cfg, folder in jobs
    ]
    dist.destroy_process_group()
    return out


def _launch(nprocs: int, *args: Any) -> list[Any]:
    from flatminima.distributed import launch_local

    return launch_local(
        nprocs,
        _dist_worker,
        args,
        env={"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"},
        start_method="fork" if torch.get_num_threads() == 1 else "spawn",
        timeout=240,
    )


def _assert_summaries_match(single: dict[str, Any], other: dict[str, Any]) -> None:
    assert other["status"] == "complete" and other["steps"] == single["steps"] > 0
    for key, value in single["final"].items():
        if isinstance(value, float) and not key.endswith("_s"):
            assert other["final"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


_DIST = dict(
    data_kwargs={"dim": 20, "num_train": 160, "num_test": 100},
    batch_size=8,
    budget="epochs",
    momentum=0.9,
    grad_clip=0.05,
)
needs_gloo = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend"
)


@needs_gloo
def test_distributed_clipping_equals_single_process(tmp_path: Path) -> None:
    rsgd = _gmm_cfg(optimizer="rsgd", num_replicas=2, gamma=0.3, **_DIST)
    sgd = _gmm_cfg(optimizer="sgd", **_DIST)
    single_rsgd = train(rsgd, tmp_path / "single-rsgd")
    single_sgd = train(sgd.replace(batch_size=16), tmp_path / "single-sgd")  # 2 ranks x 8
    jobs = [(rsgd, str(tmp_path / "dist-rsgd")), (sgd, str(tmp_path / "dist-sgd"))]
    dist_rsgd, dist_sgd = _launch(2, jobs)[0]
    _assert_summaries_match(single_rsgd, dist_rsgd)
    _assert_summaries_match(single_sgd, dist_sgd)
    # and clipping mattered in these runs
    unclipped = train(rsgd.replace(grad_clip=None), tmp_path / "unclipped")
    assert unclipped["final"]["train_loss"] != pytest.approx(
        single_rsgd["final"]["train_loss"], rel=1e-4
    )


@needs_gloo
def test_distributed_two_ranks_per_replica_clip_the_averaged_gradient(tmp_path: Path) -> None:
    # Each rank takes 8 samples of its replica's 16: the clipped gradient must be that of the
    # replica's whole minibatch (averaged over its 2 ranks, then clipped), as in the single run.
    rsgd = _gmm_cfg(optimizer="rsgd", num_replicas=2, gamma=0.3, **_DIST)
    single = train(rsgd.replace(batch_size=16), tmp_path / "single")
    other = _launch(4, [(rsgd, str(tmp_path / "dist"))], 2)[0][0]
    _assert_summaries_match(single, other)
