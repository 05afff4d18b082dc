"""The training loop across processes: same budgets, metrics, checkpoints and run folders.

:class:`DistributedTrainer` is a :class:`flatminima.train.Trainer` whose algorithm is this
process's share of the run (:mod:`flatminima.distributed.algorithms`) and that coordinates the
run folder across ranks:

- rank 0 alone writes the run folder (``config.yaml``, ``metrics.csv``, ``checkpoint.pt``,
  ``summary.json``, plus ``distributed.json`` with the process layout);
- after every epoch each rank's state (model, optimizer, loaders, RNG) is gathered on rank 0 and
  written atomically as *one* checkpoint; on resume rank 0 reads it and scatters each rank its
  own state, so the run folder need not be on a shared file system;
- the centre is evaluated once, on rank 0, while the others wait on a control group with a long
  timeout;
- a collective that fails because a peer died (its sockets close: detected at once) or hung
  (``timeout`` seconds) raises :class:`~flatminima.distributed.DistributedError` on every
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
import yaml
from torch import nn

from flatminima.data import DataSplits
from flatminima.distributed.algorithms import build_distributed_algorithm
from flatminima.distributed.context import DistContext, DistributedError, init_distributed
from flatminima.train.algorithms import Algorithm
from flatminima.train.config import TrainConfig
from flatminima.train.loop import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    SUMMARY,
    DivergenceError,
    ResumeMismatchError,
    Trainer,
    _save_atomic,
    _write_csv,
    _write_json,
    read_summary,
)

__all__ = ["DistributedTrainer", "train_distributed"]

log = logging.getLogger(__name__)

LAYOUT = "distributed.json"


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
    if isinstance(exc, DivergenceError):
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


class DistributedTrainer(Trainer):
    """A :class:`~flatminima.train.Trainer` for one rank of a distributed run.

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
        self.ctx = ctx
        shares = ctx.procs_per_replica
        if cfg.batch_size % shares:
            raise ValueError(
                f"batch_size {cfg.batch_size} must be divisible by the {shares} "
                "processes sharing one model"
            )
        show = cfg.progress if progress is None else progress
        super().__init__(cfg, None, data=data, progress=bool(show) and ctx.is_main)
        self.run_dir = Path(out_dir) if out_dir is not None else None

    def _build_algorithm(self, model_factory: Callable[[], nn.Module]) -> Algorithm:
        return build_distributed_algorithm(self.cfg, model_factory, self.device, self.ctx)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Collective: gather the models on rank 0, which evaluates them; others get ``{}``."""
        self.algo.gather_for_eval()  # type: ignore[attr-defined]
        row = super().evaluate() if self.ctx.is_main else {}
        dist.barrier(group=self.ctx.control_group)  # the others wait (long timeout) for rank 0
        return row

    # ------------------------------------------------------------------ checkpoints
    def _run_epoch(self, bar: Any) -> None:
        super()._run_epoch(bar)
        self._checkpoint()

    def _checkpoint(self) -> None:
        ctx = self.ctx
        state = _to_cpu(self.state_dict())
        states: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
        dist.gather_object(state, states, dst=0, group=ctx.control_group)
        if ctx.is_main and self.run_dir is not None:
            _write_csv(self.history, self.run_dir / METRICS)
            _save_atomic(
                {"config": self.cfg.numerics(), "distributed": ctx.layout(), "ranks": states},
                self.run_dir / CHECKPOINT,
            )
        # the others wait here (long timeout), not in the next step's collective (short timeout)
        dist.barrier(group=ctx.control_group)

    def _read_checkpoint(self) -> list[dict[str, Any]] | None:
        assert self.run_dir is not None
        path = self.run_dir / CHECKPOINT
        if not path.is_file():
            return None
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if "ranks" not in ckpt:
            raise ResumeMismatchError(
                f"{path} is a single-process checkpoint; resume it without --distributed or "
                "use another --out folder"
            )
        if ckpt["config"] != self.cfg.numerics():
            mine = self.cfg.numerics()
            diff = sorted(k for k in mine if ckpt["config"].get(k) != mine[k])
            raise ResumeMismatchError(
                f"{self.run_dir} holds a run with a different configuration (differs in: "
                f"{', '.join(diff)}); use another --out folder or delete it"
            )
        if ckpt["distributed"] != self.ctx.layout():
            raise ResumeMismatchError(
                f"{self.run_dir} was written by a process group {ckpt['distributed']}, this one "
                f"is {self.ctx.layout()}; launch the same layout to resume it"
            )
        return list(ckpt["ranks"])

    # ------------------------------------------------------------------ running
    def run(self) -> dict[str, Any] | None:  # type: ignore[override]
        """Train to the end of the budget on every rank; the summary on rank 0, None elsewhere.

        Raises:
            DistributedError: a collective failed (a peer died or hung past the timeout).
            DivergenceError: the loss became NaN/inf (on every rank at the same step).
            ResumeMismatchError: the run folder holds a different run or process layout.
        """
        try:
            return self._run()
        except BaseException as exc:
            if _is_collective_failure(exc):
                where = (
                    f"; rerun the same command to resume from {self.run_dir / CHECKPOINT}"
                    if self.run_dir is not None
                    else ""
                )
                msg = (
                    f"rank {self.ctx.rank}/{self.ctx.world_size}: a collective failed at step "
                    f"{self.step} (epoch {self.epoch + 1}): another process died, or did not "
                    f"answer within {self.ctx.timeout_s:g} s{where}. Cause: "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                )
                log.error(msg)
                raise DistributedError(msg) from exc
            raise

    def _run(self) -> dict[str, Any] | None:
        ctx, cfg = self.ctx, self.cfg
        decision: list[Any] = [None, None]  # [summary if complete, error text]
        states: list[Any] | None = None
        error: BaseException | None = None
        if ctx.is_main and self.run_dir is not None:
            try:
                summary = read_summary(self.run_dir)
                if (
                    summary is not None
                    and summary.get("status") == "complete"
                    and summary.get("config") == cfg.numerics()
                ):
                    decision[0] = summary
                else:
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                    states = self._read_checkpoint()
            except (ResumeMismatchError, OSError) as exc:
                error = exc
                decision[1] = f"{type(exc).__name__}: {exc}"
        dist.broadcast_object_list(decision, src=0, group=ctx.control_group)
        if decision[1] is not None:
            if error is not None:
                raise error
            raise ResumeMismatchError(f"rank 0 could not resume: {decision[1]}")
        if decision[0] is not None:
            log.info("%s is complete; nothing to do", self.run_dir)
            return decision[0] if ctx.is_main else None
        has_state = [states is not None]
        dist.broadcast_object_list(has_state, src=0, group=ctx.control_group)
        if has_state[0]:
            mine: list[Any] = [None]
            dist.scatter_object_list(mine, states, src=0, group=ctx.control_group)
            self.load_state_dict(mine[0])
            log.info("rank %d resumed at epoch %d (step %d)", ctx.rank, self.epoch, self.step)
        if ctx.is_main and self.run_dir is not None:
            (self.run_dir / CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            _write_json(
                {
                    **ctx.layout(),
                    "backend": ctx.backend,
                    "per_rank_batch_size": cfg.batch_size // ctx.procs_per_replica,
                },
                self.run_dir / LAYOUT,
            )
            if cfg.tensorboard:
                self.out_dir = self.run_dir
                self._open_tensorboard()
                self.out_dir = None
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.plan.total_steps,
                initial=self.step,
                unit="step",
                desc=f"{cfg.optimizer} x{ctx.world_size} {cfg.model}/{cfg.data}",
                leave=False,
            )
        try:
            while self.step < self.plan.total_steps:
                self._run_epoch(bar)
        except DivergenceError as exc:
            self._write_summary("diverged", str(exc))
            raise
        finally:
            if bar is not None:
                bar.close()
            if self._tb is not None:
                self._tb.close()
        return self._write_summary("complete")

    def _write_summary(self, status: str, message: str | None = None) -> dict[str, Any] | None:
        if not self.ctx.is_main:
            return None
        summary = self._finish(status, message)  # out_dir is None: writes nothing
        summary["distributed"] = {**self.ctx.layout(), "backend": self.ctx.backend}
        if self.run_dir is not None:
            _write_json(summary, self.run_dir / SUMMARY)
        return summary


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
        summary = DistributedTrainer(eff, out_dir, ctx, data=data, progress=progress).run()
    except BaseException:
        # The group is left to process exit: destroying it could block on a dead peer, and the
        # error must reach the caller within the timeout.
        log.debug("rank %d: leaving the process group after a failure", ctx.rank)
        raise
    ctx.close()
    return summary
