"""The training loop across processes: same budgets, metrics, checkpoints and run folders.

There is one training loop, :class:`flatminima.train.Trainer`; a distributed run gives it the
:class:`TorchDistributedSync` strategy, which makes it:

- build this process's share of the algorithm (:mod:`flatminima.distributed.algorithms`);
- let rank 0 alone write the run folder (``config.yaml``, ``metrics.csv``, ``checkpoint.pt``,
  ``summary.json``, plus ``distributed.json`` with the process layout) and hold its lock;
- after every evaluation point gather each rank's state (model, optimizer, loaders, RNG) on
  rank 0, which writes it atomically as *one* checkpoint; on resume rank 0 reads it and scatters
  each rank its own state, so the run folder need not be on a shared file system;
- evaluate the centre once, on rank 0, while the others wait on a control group with a long
  timeout;
- turn a collective that fails because a peer died (its sockets close: detected at once) or hung
  (``timeout`` seconds) into :class:`~flatminima.distributed.DistributedError` on every
  surviving rank; rerunning the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flatminima.data import DataSplits
from flatminima.distributed.algorithms import build_distributed_algorithm
from flatminima.distributed.context import DistContext, DistributedError, init_distributed
from flatminima.train.algorithms import Algorithm
from flatminima.train.config import TrainConfig
from flatminima.train.loop import DivergenceError, LocalSync, Trainer
from flatminima.train.run_folder import ResumeMismatchError, RunFolderError

__all__ = ["DistributedTrainer", "TorchDistributedSync", "train_distributed"]

log = logging.getLogger(__name__)


def _to_cpu(obj: Any) -> Any:
    """A copy of a nested state with every tensor on the CPU (for pickling across ranks)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def _is_collective_failure(exc: BaseException) -> bool:
    if isinstance(exc, (DivergenceError, RunFolderError)):
        return False
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc)
    return any(
        s in text
        for s in (
            "gloo",
            "Gloo",
            "NCCL",
            "Connection closed",
            "Connection reset",
            "Timed out",
            "timed out",
            "Socket Timeout",
        )
    )


class TorchDistributedSync(LocalSync):
    """Synchronisation strategy of one rank of a ``torch.distributed`` run (see the module).

    Args:
        ctx: this process's :class:`DistContext`.
    """

    checkpoint_device = "cpu"  # rank 0 reads every rank's state, then scatters it

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.is_main = ctx.is_main
        self.label = f" x{ctx.world_size}"
        self._batch_size: int | None = None

    def build_algorithm(
        self, cfg: TrainConfig, factory: Callable[[], nn.Module], device: torch.device
    ) -> Algorithm:
        self._batch_size = cfg.batch_size
        return build_distributed_algorithm(cfg, factory, device, self.ctx)

    def share(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.ctx.control_group)
        return box[0]

    def before_eval(self, algo: Algorithm) -> None:
        algo.gather_for_eval()  # type: ignore[attr-defined]

    def after_eval(self) -> None:
        dist.barrier(group=self.ctx.control_group)  # the others wait (long timeout) for rank 0

    def checkpoint(self, state: dict[str, Any], cfg: TrainConfig) -> Any | None:
        ctx = self.ctx
        states: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
        dist.gather_object(_to_cpu(state), states, dst=0, group=ctx.control_group)
        if not ctx.is_main:
            return None
        return {"config": cfg.numerics(), "distributed": ctx.layout(), "ranks": states}

    def after_checkpoint(self) -> None:
        # the others wait here (long timeout), not in the next step's collective (short timeout)
        dist.barrier(group=self.ctx.control_group)

    def unpack(self, ckpt: Any, path: Path) -> Any:
        if "ranks" not in ckpt:
            raise ResumeMismatchError(
                f"{path} is a single-process checkpoint; resume it without --distributed or "
                "use another --out folder"
            )
        if ckpt["distributed"] != self.ctx.layout():
            raise ResumeMismatchError(
                f"{path.parent} was written by a process group {ckpt['distributed']}, this one "
                f"is {self.ctx.layout()}; launch the same layout to resume it"
            )
        return list(ckpt["ranks"])

    def distribute(self, unpacked: Any) -> Any:
        has_state = self.share(unpacked is not None)
        if not has_state:
            return None
        mine: list[Any] = [None]
        dist.scatter_object_list(mine, unpacked, src=0, group=self.ctx.control_group)
        return mine[0]

    def layout(self) -> dict[str, Any] | None:
        ctx = self.ctx
        per_rank = (self._batch_size or 0) // ctx.procs_per_replica
        return {**ctx.layout(), "backend": ctx.backend, "per_rank_batch_size": per_rank}

    def failure(self, exc: BaseException, trainer: Trainer) -> BaseException | None:
        if not _is_collective_failure(exc):
            return None
        ctx = self.ctx
        where = (
            f"; rerun the same command to resume from {trainer.out_dir / 'checkpoint.pt'}"
            if trainer.out_dir is not None
            else ""
        )
        msg = (
            f"rank {ctx.rank}/{ctx.world_size}: a collective failed at step "
            f"{trainer.step} (evaluation point {trainer.eval_point + 1}): another process died, "
            "or did not "
            f"answer within {ctx.timeout_s:g} s{where}. Cause: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        )
        log.error(msg)
        return DistributedError(msg)


class DistributedTrainer(Trainer):
    """The :class:`~flatminima.train.Trainer` of one rank: the trainer with the
    :class:`TorchDistributedSync` strategy.

    Build it on every rank with the same config (already scaled to the effective batch, see
    :func:`train_distributed`); call :meth:`run` on every rank.

    Args:
        cfg: the run's config; ``cfg.batch_size`` is the minibatch of one *model* (a replica, or
            the data-parallel model), which the ranks sharing that model split evenly.
        out_dir: the run folder (written by rank 0 only), or ``None``.
        ctx: this process's :class:`DistContext`.
        data: optional preloaded data splits (the same on every rank).
        progress: show a progress bar on rank 0 (default ``cfg.progress``).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | Path | None,
        ctx: DistContext,
        *,
        data: DataSplits | None = None,
        progress: bool | None = None,
    ) -> None:
        shares = ctx.procs_per_replica
        if cfg.batch_size % shares:
            raise ValueError(
                f"batch_size {cfg.batch_size} must be divisible by the {shares} "
                "processes sharing one model"
            )
        self.ctx = ctx
        super().__init__(cfg, out_dir, data=data, progress=progress, sync=TorchDistributedSync(ctx))


def train_distributed(
    cfg: TrainConfig,
    out_dir: str | Path | None,
    *,
    procs_per_replica: int = 1,
    timeout: float = 120.0,
    backend: str | None = None,
    data: DataSplits | None = None,
    progress: bool | None = None,
) -> dict[str, Any] | None:
    """Train one run across the processes of a ``torchrun`` (or :func:`launch_local`) launch.

    Call it on every rank. ``--optimizer rsgd``: one replica per group of ``procs_per_replica``
    (``G``) processes, so the world size must be ``W = num_replicas * G``; each rank draws
    ``batch_size`` samples, a replica's minibatch is ``G * batch_size`` samples, and the centre is
    an all-reduce every ``coupling_every`` steps. Other optimizers (sgd, esgd, sam): data-parallel
    over all ``W`` ranks (DDP gradient averaging), a global minibatch of ``W * batch_size``.
    ``config.yaml`` records that per-model minibatch, so the run folder equals the one of the
    single-process run it reproduces (``distributed.json`` has the layout and per-rank size).

    Args:
        cfg: the run's config (``batch_size`` per rank).
        out_dir: the run folder (rank 0 writes it); rerunning resumes from its checkpoint.
        procs_per_replica: ``G`` (rsgd only).
        timeout: seconds a collective may wait for a peer before failing (``--dist-timeout``).
        backend: ``"gloo"`` or ``"nccl"`` (default: NCCL for CUDA devices, gloo otherwise).
        data: optional preloaded data splits (the same on every rank).
        progress: progress bar on rank 0 (default ``cfg.progress``).

    Returns:
        the run summary on rank 0, ``None`` on the other ranks.

    Raises:
        ValueError: a world size other than ``num_replicas * procs_per_replica`` (naming both),
            ``procs_per_replica != 1`` for a data-parallel optimizer, or a missing launcher
            environment.
        DistributedError: a peer process died or hung (after ``timeout`` seconds).
        DivergenceError, ResumeMismatchError: as :func:`flatminima.train.train`.
    """
    cfg.validate()
    if (
        isinstance(procs_per_replica, bool)
        or not isinstance(procs_per_replica, int)
        or procs_per_replica < 1
    ):
        raise ValueError(
            f"Invalid procs_per_replica: {procs_per_replica!r} (must be a positive integer)"
        )
    if cfg.optimizer == "rsgd":
        ctx = init_distributed(
            cfg.num_replicas, procs_per_replica, device=cfg.device, timeout=timeout, backend=backend
        )
    else:
        if procs_per_replica != 1:
            raise ValueError(
                f"procs_per_replica={procs_per_replica} applies to rsgd only; optimizer "
                f"{cfg.optimizer!r} is data-parallel over all processes"
            )
        world = (
            dist.get_world_size()
            if dist.is_initialized()
            else int(os.environ.get("WORLD_SIZE", "1"))
        )
        ctx = init_distributed(1, world, device=cfg.device, timeout=timeout, backend=backend)
    try:
        eff = cfg.replace(batch_size=cfg.batch_size * ctx.procs_per_replica, device=str(ctx.device))
        trainer = DistributedTrainer(eff, out_dir, ctx, data=data, progress=progress)
        summary: dict[str, Any] | None = trainer.run()
        if not ctx.is_main:
            summary = None
    except BaseException:
        # The group is left to process exit: destroying it could block on a dead peer, and the
        # error must reach the caller within the timeout.
        log.debug("rank %d: leaving the process group after a failure", ctx.rank)
        raise
    ctx.close()
    return summary
