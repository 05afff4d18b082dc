"""flatminima.distributed: Replicated-SGD (and data-parallel baselines) across processes.

One replica per process, or per data-parallel group of ``G`` processes; the centre of the
replicas is an all-reduce mean every ``coupling_every`` steps, and replica gradients are never
averaged across replicas (Pittorino et al., ICLR 2021, arXiv 2006.07897). Launch with
``torchrun --nproc_per_node=W -m flatminima train --distributed ...`` (NCCL on GPUs, gloo on CPUs)
or, without torchrun, :func:`launch_local`. See docs/distributed.md.
"""

from flatminima.distributed.algorithms import (
    DistributedReplicatedAlgorithm,
    build_distributed_algorithm,
    data_parallel_algorithm,
)
from flatminima.distributed.context import DistContext, DistributedError, init_distributed
from flatminima.distributed.launch import LaunchError, free_port, launch_local
from flatminima.distributed.optim import DistributedReplicatedSGD
from flatminima.distributed.trainer import DistributedTrainer, train_distributed

__all__ = [
    "DistContext",
    "DistributedError",
    "DistributedReplicatedAlgorithm",
    "DistributedReplicatedSGD",
    "DistributedTrainer",
    "LaunchError",
    "build_distributed_algorithm",
    "data_parallel_algorithm",
    "free_port",
    "init_distributed",
    "launch_local",
    "train_distributed",
]
