"""Per-process algorithm adapters for the training loop (see :mod:`flatminima.train.algorithms`).

- :class:`DistributedReplicatedAlgorithm`: rSGD with this process's replica as the local model
  and the centre as an all-reduce; with ``G`` processes per replica each takes slice ``j`` of the
  replica's minibatch of ``G * batch_size`` samples.
- :func:`data_parallel_algorithm`: SGD, eSGD and SAM with DDP gradient averaging over all ranks,
  rank ``r`` taking slice ``r`` of a global minibatch of ``W * batch_size`` samples.

Every rank draws the *same* minibatch stream as the single-process run (replica ``a`` reads
stream ``a``, seeded ``seed * 1009 + a``) and keeps its slice, so the distributed run computes the
single-process numbers up to floating-point rounding of the reductions.

Gradient clipping (``cfg.grad_clip``) follows the single-process adapters: the replica's gradient
(averaged over its ``G`` ranks, before the coupling) is clipped on its own; the data-parallel
baselines clip the all-reduced gradient after each backward (the same on every rank, so the ranks
stay in step).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from flatminima.distributed.context import DistContext
from flatminima.distributed.optim import DistributedReplicatedSGD
from flatminima.optim import Replicas, update_bn
from flatminima.train.algorithms import (
    ALGORITHMS,
    Algorithm,
    Batch,
    NextBatch,
    center_and_replicas,
    clip_grad_norm_rows_,
    replicated_settings,
)
from flatminima.train.config import TrainConfig

__all__ = [
    "DistributedReplicatedAlgorithm",
    "build_distributed_algorithm",
    "data_parallel_algorithm",
]

log = logging.getLogger(__name__)


def slice_batch(batch: Batch, part: int, parts: int) -> Batch:
    """Slice ``part`` of ``parts`` equal slices of a minibatch (its size must divide evenly)."""
    x, y = batch
    n = len(y) // parts
    if n * parts != len(y):
        raise ValueError(
            f"A minibatch of {len(y)} samples cannot be split into {parts} equal slices"
        )
    return x[part * n : (part + 1) * n], y[part * n : (part + 1) * n]


def mean_over_ranks(value: float, device: torch.device, group: Any = None) -> float:
    """The mean of a scalar over the ranks of ``group`` (one all-reduce of one number)."""
    t = torch.tensor(
        [value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device
    )
    dist.all_reduce(t, group=group)
    return float(t) / dist.get_world_size(group)


class DistributedReplicatedAlgorithm(Algorithm):
    """Replicated-SGD adapter where this process trains replica ``ctx.replica``.

    Initialisation: every rank builds the same ``Replicas(factory, y, init, seed=cfg.seed)`` as
    the single-process :class:`~flatminima.train.algorithms.ReplicatedSGDAlgorithm` and keeps a
    copy of replica ``a = rank // G``, so the initial weights match it exactly.

    Evaluation (:meth:`gather_for_eval`, a collective on every rank): the flat parameters and
    floating-point buffers of all ranks are gathered on rank 0, which rebuilds the ``y`` replicas
    (buffers averaged over a replica's ``G`` ranks) and the centre (parameters = replica mean,
    BatchNorm statistics averaged over replicas, or recalibrated with ``cfg.bn="recalibrate"``),
    exactly what the single-process adapter reports.
    """

    name = "rsgd"

    def __init__(
        self,
        cfg: TrainConfig,
        model_factory: Callable[[], nn.Module],
        device: torch.device,
        ctx: DistContext,
    ) -> None:
        if ctx.num_replicas != cfg.num_replicas:
            raise ValueError(
                f"num_replicas={cfg.num_replicas} but the process group has "
                f"{ctx.num_replicas} replicas"
            )
        self._init_common(cfg, device)
        self.ctx = ctx
        self.num_streams = cfg.num_replicas
        self.passes_per_step = cfg.num_replicas
        replicas = Replicas(model_factory, cfg.num_replicas, init=cfg.replica_init, seed=cfg.seed)
        model = copy.deepcopy(replicas[ctx.replica])
        del replicas
        for p in model.parameters():
            p.grad = None
        self.model = model.to(device)
        self.optimizer: DistributedReplicatedSGD = DistributedReplicatedSGD(
            self.model.parameters(), **replicated_settings(cfg), replica_group=ctx.replica_group
        )
        self._eval_replicas: list[nn.Module] = []
        self._eval_center: nn.Module | None = None

    def step(self, next_batch: NextBatch) -> float:
        """One rSGD step of the local replica; returns the loss averaged over all replicas."""
        ctx, opt = self.ctx, self.optimizer
        batch = slice_batch(next_batch(ctx.replica), ctx.replica_rank, ctx.procs_per_replica)
        opt.zero_grad()
        loss = self.loss(self.model, batch)
        if self.scaler is not None:
            # Average the scaled gradients first, so the G ranks of a replica agree on inf/NaN;
            # couple on every rank (a collective) even when the scaler then skips the update.
            self.scaler.scale(loss).backward()
            opt.average_gradients()
            self.scaler.unscale_(opt)
            opt.couple()
            before = opt.steps
            self.scaler.step(opt)
            if opt.steps == before:
                opt.skip_step()
            self.scaler.update()
        else:
            loss.backward()
            if self.cfg.grad_clip is not None:
                # clip the replica's gradient: the mean over its G ranks, before the coupling
                opt.average_gradients()
                clip_grad_norm_rows_([opt.flat_grad.unsqueeze(0)], self.cfg.grad_clip)
            opt.step()
        return mean_over_ranks(float(loss.detach()), self.device)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def gather_for_eval(self) -> None:
        """Collective: gather every rank's replica on rank 0 and rebuild replicas and centre."""
        ctx = self.ctx
        flat = self.optimizer.flat.detach()
        bufs = [b for b in self.model.buffers() if b.is_floating_point()]
        payload = torch.cat([flat] + [b.reshape(-1).to(flat.dtype) for b in bufs])
        rows = [torch.empty_like(payload) for _ in range(ctx.world_size)] if ctx.is_main else None
        dist.gather(payload, rows, dst=0)
        if not ctx.is_main:
            return
        assert rows is not None
        y, g, n = ctx.num_replicas, ctx.procs_per_replica, flat.numel()
        if not self._eval_replicas:
            self._eval_replicas = [copy.deepcopy(self.model) for _ in range(y)]
            self._eval_center = copy.deepcopy(self.model)
        per_replica = []
        for a in range(y):
            group_rows = torch.stack(rows[a * g : (a + 1) * g])
            params = group_rows[0, :n]  # identical on the G ranks of a replica
            buffers = group_rows[:, n:].mean(0)
            self._load(self._eval_replicas[a], params, buffers)
            per_replica.append(torch.cat([params, buffers]))
        mean = torch.stack(per_replica).mean(0)
        assert self._eval_center is not None
        self._load(self._eval_center, mean[:n], mean[n:])

    def _load(self, module: nn.Module, params: torch.Tensor, buffers: torch.Tensor) -> None:
        off = 0
        for p in module.parameters():
            k = p.numel()
            p.copy_(params[off : off + k].view_as(p))
            off += k
        off = 0
        for b in module.buffers():
            if b.is_floating_point():
                k = b.numel()
                b.copy_(buffers[off : off + k].view_as(b))
                off += k
        # integer buffers (num_batches_tracked) are the same on every rank: the local copy's
        for b, local in zip(module.buffers(), self.model.buffers()):
            if not b.is_floating_point():
                b.copy_(local)

    def eval_models(self, recalibrate_data: Iterator[Batch] | None = None) -> dict[str, nn.Module]:
        """Rank 0: the centre and the replicas of the last :meth:`gather_for_eval`."""
        if self._eval_center is None:
            raise RuntimeError("gather_for_eval() must run on every rank before eval_models()")
        center = self._eval_center
        if self.cfg.bn == "recalibrate" and recalibrate_data is not None:
            update_bn(recalibrate_data, center)
        return center_and_replicas(center, self._eval_replicas)

    def ensemble_members(self) -> list[nn.Module]:
        return list(self._eval_replicas)


def data_parallel_algorithm(base: type[Algorithm]) -> type[Algorithm]:
    """A data-parallel version of a single-model adapter (SGD, eSGD, SAM).

    The model is wrapped in ``DistributedDataParallel`` over all ranks, so every backward pass
    (the eSGD inner steps and both SAM passes included) averages the gradient over the ``W``
    ranks; rank ``r`` takes slice ``r`` of each minibatch of ``W * batch_size`` samples. BatchNorm
    buffers are broadcast from rank 0 at each forward (DDP's default); rank 0's model is the one
    evaluated and checkpointed.
    """

    class DataParallel(base):  # type: ignore[valid-type,misc]
        def __init__(
            self,
            cfg: TrainConfig,
            model_factory: Callable[[], nn.Module],
            device: torch.device,
            ctx: DistContext,
        ) -> None:
            self.ctx = ctx
            super().__init__(cfg, model_factory, device)
            self.module = self.model  # type: ignore[has-type]
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=ids)

        def step(self, next_batch: NextBatch) -> float:
            ctx = self.ctx

            def sliced(stream: int) -> Batch:
                return slice_batch(next_batch(stream), ctx.rank, ctx.world_size)

            return mean_over_ranks(super().step(sliced), self.device)

        def gather_for_eval(self) -> None:
            """Nothing to gather: the ranks hold the same weights."""

        def eval_models(
            self, recalibrate_data: Iterator[Batch] | None = None
        ) -> dict[str, nn.Module]:
            return {"model": self.module}

        def state_dict(self) -> dict[str, Any]:
            state = super().state_dict()
            state["model"] = self.module.state_dict()
            return state

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.module.load_state_dict(state["model"])
            rest = dict(state)
            rest["model"] = self.model.state_dict()  # already loaded: a no-op for the base
            super().load_state_dict(rest)

    DataParallel.__name__ = DataParallel.__qualname__ = f"DataParallel{base.__name__}"
    return DataParallel


def build_distributed_algorithm(
    cfg: TrainConfig, model_factory: Callable[[], nn.Module], device: torch.device, ctx: DistContext
) -> Algorithm:
    """The per-process adapter for ``cfg.optimizer`` (rsgd: replicas; others: data-parallel)."""
    if cfg.optimizer == "rsgd":
        return DistributedReplicatedAlgorithm(cfg, model_factory, device, ctx)
    try:
        base = ALGORITHMS[cfg.optimizer]
    except KeyError:
        raise ValueError(
            f"Unknown optimizer {cfg.optimizer!r}; valid: {', '.join(ALGORITHMS)}"
        ) from None
    return data_parallel_algorithm(base)(cfg, model_factory, device, ctx)  # type: ignore[call-arg]
