"""Entropic flat-minima optimizers: Entropy-SGD, Replicated-SGD, SAM and coupling schedules.

======  ======================================  ===============  ========  ====================
name    optimizer                               step(closure)    replicas  grad evals / step
======  ======================================  ===============  ========  ====================
sgd     ``torch.optim.SGD``                     optional         no        1
esgd    ``EntropySGD``                          required         no        L (``inner_steps``)
rsgd    ``ReplicatedSGD`` over ``Replicas``     optional         yes       y (``num_replicas``)
sam     ``SAM``                                 required         no        2
======  ======================================  ===============  ========  ====================

"required" means ``step(closure)`` must be used (or the phase API: ``inner_step``/``outer_step``
for Entropy-SGD, ``first_step``/``second_step`` for SAM). Every flatminima optimizer counts
backward passes of one minibatch in ``grad_evals`` (saved in its ``state_dict``; read-only alias
``passes``). These facts live in one place, :data:`flatminima.optim.registry.REGISTRY`, which
every other module reads.

Without a closure (a plain ``loss.backward(); opt.step()`` loop, Lightning, the Hugging Face
Trainer): ``EntropySGD(..., one_batch_per_step=True)`` makes every ``step()`` one Langevin step on
the current minibatch (the outer update every ``inner_steps``-th call); SAM runs the two-call
protocol (``first_step(zero_grad=True)`` / ``second_step(zero_grad=True)``). EntropySGD's outer
step may use any base optimizer (``base_optimizer=torch.optim.AdamW``), as SAM's does.
"""

from flatminima.optim.entropy_sgd import EntropySGD
from flatminima.optim.registry import REGISTRY, OptimizerSpec, optimizer_spec
from flatminima.optim.replicated import Replicas, ReplicatedSGD, update_bn
from flatminima.optim.replicated_module import ReplicatedModule
from flatminima.optim.sam import SAM, disable_running_stats, enable_running_stats
from flatminima.optim.schedules import (
    ConstantGamma,
    CosineGamma,
    ExponentialGamma,
    GammaScheduler,
    LinearGamma,
    auto_gamma0,
    constant_gamma,
    cosine_gamma,
    exponential_gamma,
    linear_gamma,
)

OPTIMIZERS: tuple[str, ...] = tuple(REGISTRY)
"""Registry names of the optimizers (a view of :data:`~flatminima.optim.registry.REGISTRY`)."""

OPTIMIZER_CAPABILITIES: dict[str, dict[str, bool]] = {
    name: {"needs_closure": spec.needs_closure, "needs_replicas": spec.needs_replicas}
    for name, spec in REGISTRY.items()
}
"""Capability flags per registry name (a view of the registry)."""

__all__ = [
    "OPTIMIZERS",
    "OPTIMIZER_CAPABILITIES",
    "REGISTRY",
    "OptimizerSpec",
    "optimizer_spec",
    "EntropySGD",
    "Replicas",
    "ReplicatedSGD",
    "ReplicatedModule",
    "update_bn",
    "SAM",
    "disable_running_stats",
    "enable_running_stats",
    "GammaScheduler",
    "ConstantGamma",
    "ExponentialGamma",
    "LinearGamma",
    "CosineGamma",
    "constant_gamma",
    "exponential_gamma",
    "linear_gamma",
    "cosine_gamma",
    "auto_gamma0",
]
