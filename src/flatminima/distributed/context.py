"""Process-group setup: who this process is, which replica it trains, which groups it talks in.

Layout for ``y`` replicas x ``G`` processes per replica (world size ``W = y * G``): rank ``r``
trains replica ``a = r // G`` and is member ``j = r % G`` of that replica's data-parallel group
``{a*G, ..., a*G + G - 1}``. The data-parallel baselines (SGD, eSGD, SAM) are the case ``y = 1``,
``G = W``: every rank is a member of the one model's group.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistContext", "DistributedError", "init_distributed"]

log = logging.getLogger(__name__)

#: collectives on the control group (objects, checkpoints, waiting for rank 0's evaluation) may
#: legitimately wait this long; a dead peer is still detected at once (its sockets close).
MIN_CONTROL_TIMEOUT_S = 1800.0

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective failed: another process died, or did not answer within the timeout."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run.

    Attributes:
        rank: global rank ``r``.
        world_size: ``W = num_replicas * procs_per_replica``.
        local_rank: rank on this machine (``LOCAL_RANK``), which picks the GPU.
        num_replicas: ``y``, the number of models trained (1 for data-parallel baselines).
        procs_per_replica: ``G``, the processes sharing one model's minibatch.
        replica: ``a = r // G``, the model this process trains.
        replica_rank: ``j = r % G``, this process's slice of the model's minibatch.
        replica_group: the process group of the ``G`` ranks of replica ``a`` (``None`` when
            ``G = 1``: nothing to average).
        control_group: a gloo group over all ranks with a long timeout, for Python objects
            (checkpoints) and for waiting while rank 0 evaluates.
        backend: ``"nccl"`` or ``"gloo"``.
        device: the device this rank computes on.
        timeout_s: the timeout of collectives on the default group, in seconds.
        owns_group: whether :func:`init_distributed` created the default group (and so
            :meth:`close` destroys it).
    """

    rank: int
    world_size: int
    local_rank: int
    num_replicas: int
    procs_per_replica: int
    replica: int
    replica_rank: int
    replica_group: Any
    control_group: Any
    backend: str
    device: torch.device
    timeout_s: float
    owns_group: bool

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder and evaluates the centre."""
        return self.rank == 0

    def layout(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed by this process group."""
        return {
            "world_size": self.world_size,
            "num_replicas": self.num_replicas,
            "procs_per_replica": self.procs_per_replica,
        }

    def close(self) -> None:
        """Destroy the default process group if :func:`init_distributed` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(
                f"Environment variable {name} is not set: launch with torchrun "
                "(torchrun --nproc_per_node=N -m flatminima train --distributed ...) or "
                "flatminima.distributed.launch_local"
            )
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"Invalid {name}={value!r} in the environment (must be an integer)"
        ) from None


def init_distributed(
    num_replicas: int,
    procs_per_replica: int = 1,
    *,
    device: str = "cpu",
    timeout: float = 120.0,
    backend: str | None = None,
) -> DistContext:
    """Join (or create) the default process group from torchrun's environment variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; picks NCCL
    for CUDA devices and gloo otherwise; sets every collective's timeout to ``timeout`` seconds,
    so that a process whose peer died or hung fails with an error instead of waiting forever;
    then creates the replica groups (every rank takes part in creating all of them, as
    ``torch.distributed.new_group`` requires) and a gloo control group.

    Args:
        num_replicas: ``y``; the world size must be ``y * procs_per_replica``.
        procs_per_replica: ``G``, data-parallel processes per replica.
        device: ``"cpu"`` or ``"cuda"`` (the rank uses ``cuda:LOCAL_RANK``), or ``"cuda:K"``.
        timeout: seconds a collective may wait for the other ranks (must be > 0).
        backend: force ``"gloo"`` or ``"nccl"`` (default: from the device).

    Returns:
        the :class:`DistContext` of this process.

    Raises:
        ValueError: a missing environment variable, ``timeout <= 0``, an unknown backend, or a
            world size that is not ``num_replicas * procs_per_replica`` (naming both).
    """
    for name, value in (("num_replicas", num_replicas), ("procs_per_replica", procs_per_replica)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {name}: {value!r} (must be a positive integer)")
    if not timeout > 0:
        raise ValueError(f"Invalid timeout: {timeout!r} seconds (must be > 0)")
    owns = not dist.is_initialized()
    if owns:
        missing = [n for n in _ENV if n not in os.environ]
        if missing:
            raise ValueError(
                f"Environment variable(s) {', '.join(missing)} not set: launch with torchrun "
                "(torchrun --nproc_per_node=N -m flatminima train --distributed ...) or "
                "flatminima.distributed.launch_local"
            )
    rank = dist.get_rank() if not owns else _env_int("RANK")
    world = dist.get_world_size() if not owns else _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", rank)
    if world != num_replicas * procs_per_replica:
        raise ValueError(
            f"World size {world} must equal num_replicas ({num_replicas}) x procs_per_replica "
            f"({procs_per_replica}) = {num_replicas * procs_per_replica}; launch "
            f"{num_replicas * procs_per_replica} processes or change --num-replicas / "
            "--procs-per-replica"
        )
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"Invalid device {device!r}: CUDA is not available here")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"Invalid backend: {backend!r}; valid: gloo, nccl")
    td = datetime.timedelta(seconds=timeout)
    if owns:
        if os.environ.get("MASTER_ADDR") in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # single-machine runs
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(backend, timeout=td, rank=rank, world_size=world, **kwargs)
    else:
        backend = str(dist.get_backend())
    replica_group = None
    for a in range(num_replicas):
        ranks = list(range(a * procs_per_replica, (a + 1) * procs_per_replica))
        group = dist.new_group(ranks, timeout=td) if procs_per_replica > 1 else None
        if rank in ranks:
            replica_group = group
    control = dist.new_group(
        backend="gloo", timeout=datetime.timedelta(seconds=max(timeout, MIN_CONTROL_TIMEOUT_S))
    )
    ctx = DistContext(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        num_replicas=num_replicas,
        procs_per_replica=procs_per_replica,
        replica=rank // procs_per_replica,
        replica_rank=rank % procs_per_replica,
        replica_group=replica_group,
        control_group=control,
        backend=backend,
        device=dev,
        timeout_s=float(timeout),
        owns_group=owns,
    )
    log.info(
        "rank %d/%d: replica %d (member %d of %d), backend %s, device %s",
        rank,
        world,
        ctx.replica,
        ctx.replica_rank,
        procs_per_replica,
        backend,
        dev,
    )
    return ctx
