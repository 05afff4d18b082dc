"""The one registry of the torch optimizers: one :class:`OptimizerSpec` per name.

Every place that lists the optimizers reads :data:`REGISTRY` (the config's valid names, the
training adapters, the studies, the command-line choices and help, the plot colours), so a new
entry is seen everywhere and a name is written once.

Units. A **pass** is one backward pass of one minibatch (a gradient evaluation of one network
on ``batch_size`` samples). One optimizer step costs :meth:`OptimizerSpec.passes_per_step`
passes (over all model copies) and draws :meth:`OptimizerSpec.minibatches_per_step`
minibatches from each data stream; **samples** through backward are passes x batch size.

======  ==================  ========================  ===================  =======  ========
name    passes per step     minibatches per stream    same run both        closure  replicas
                                                      budgets
======  ==================  ========================  ===================  =======  ========
sgd     1                   1                         yes                  no       no
esgd    ``inner_steps``     ``inner_steps``           yes                  yes      no
rsgd    ``num_replicas``    1                         no                   no       yes
sam     2                   1                         no                   yes      no
======  ==================  ========================  ===================  =======  ========

Budgets. At equal backward passes (``budget="grad-evals"``) a run takes
``epochs * batches / passes_per_step`` steps; at equal epochs per model copy
(``budget="epochs"``) ``epochs * batches / minibatches_per_step``, with ``batches`` the full
minibatches in one epoch of data. The two coincide exactly when passes and minibatches per
step are declared alike (:attr:`OptimizerSpec.same_run_both_budgets`); otherwise equal epochs
cost :meth:`OptimizerSpec.passes_per_sample` times the passes of SGD.

Example:
    >>> from flatminima.optim.registry import REGISTRY, optimizer_spec
    >>> list(REGISTRY)
    ['sgd', 'esgd', 'rsgd', 'sam']
    >>> spec = optimizer_spec("rsgd")
    >>> spec.passes_per_step({"num_replicas": 3}), spec.passes_per_sample({"num_replicas": 3})
    (3, 3)
    >>> optimizer_spec("esgd").same_run_both_budgets, spec.knobs
    (True, ('lr', 'gamma'))
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from flatminima.optim.entropy_sgd import EntropySGD
from flatminima.optim.replicated import ReplicatedSGD
from flatminima.optim.sam import SAM

__all__ = ["OptimizerSpec", "REGISTRY", "optimizer_spec"]

# settings every optimizer's coupling schedule reads (eSGD, rSGD)
_COUPLING = ("gamma", "gamma_growth", "gamma_max")


@dataclass(frozen=True)
class OptimizerSpec:
    """What the rest of the package needs to know about one optimizer.

    Attributes:
        name: registry name (the config's ``optimizer`` value).
        optimizer: the ``torch.optim.Optimizer`` class that makes the updates.
        description: one line, shown in help texts.
        passes: backward passes of one minibatch per optimizer step, over all model copies:
            a number, or the name of the setting that gives it.
        minibatches: minibatches drawn from each data stream per optimizer step: a number,
            or the name of the setting that gives it.
        needs_closure: ``step(closure)`` is required (or the optimizer's phase API).
        needs_replicas: the parameters are a ``Replicas`` group (one data stream per replica).
        knobs: the settings a study tunes on a grid (primary axes).
        follow_up_knobs: settings a study tunes afterwards, one at a time at the chosen point.
        settings: the optimizer-specific settings it reads (every setting that not all
            optimizers read is listed under each optimizer that reads it).
        color: its matplotlib colour in every plot.
    """

    name: str
    optimizer: type[torch.optim.Optimizer]
    description: str
    passes: int | str
    minibatches: int | str
    needs_closure: bool
    needs_replicas: bool
    knobs: tuple[str, ...]
    follow_up_knobs: tuple[str, ...]
    settings: tuple[str, ...]
    color: str

    @property
    def same_run_both_budgets(self) -> bool:
        """True if equal passes and equal epochs give the same number of steps (any settings).

        ``epochs * batches / passes`` equals ``epochs * batches / minibatches`` for every
        setting exactly when both counts are declared alike.
        """
        return self.passes == self.minibatches

    def passes_per_step(self, settings: Mapping[str, Any] | Any) -> int:
        """Backward passes of one minibatch per optimizer step, over all model copies.

        Args:
            settings: a mapping or an object with attributes (e.g. a ``TrainConfig``).

        Raises:
            ValueError: the setting named by :attr:`passes` is missing or not an integer >= 1.
        """
        return self._count(self.passes, settings)

    def minibatches_per_step(self, settings: Mapping[str, Any] | Any) -> int:
        """Minibatches drawn from each data stream per optimizer step.

        Raises:
            ValueError: as :meth:`passes_per_step`, for the setting named by :attr:`minibatches`.
        """
        return self._count(self.minibatches, settings)

    def passes_per_sample(self, settings: Mapping[str, Any] | Any) -> int | float:
        """Backward passes per sample one data stream delivers: ``passes / minibatches``.

        The cost of equal epochs relative to SGD: rSGD ``y``, SAM 2, SGD and eSGD 1 (an integer
        when the division is exact).
        """
        p, m = self.passes_per_step(settings), self.minibatches_per_step(settings)
        q, r = divmod(p, m)
        return q if r == 0 else p / m

    def _count(self, count: int | str, settings: Mapping[str, Any] | Any) -> int:
        if isinstance(count, int):
            return count
        if isinstance(settings, Mapping):
            value = settings.get(count)
        else:
            value = getattr(settings, count, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{self.name}: setting {count!r} must be an integer >= 1, got {value!r}"
            )
        return value


_SPECS = (
    OptimizerSpec(
        name="sgd",
        optimizer=torch.optim.SGD,
        description="SGD with momentum (torch.optim.SGD)",
        passes=1,
        minibatches=1,
        needs_closure=False,
        needs_replicas=False,
        knobs=("lr",),
        follow_up_knobs=(),
        settings=(),
        color="tab:blue",
    ),
    OptimizerSpec(
        name="esgd",
        optimizer=EntropySGD,
        description="Entropy-SGD (inner_steps Langevin steps per outer step)",
        passes="inner_steps",
        minibatches="inner_steps",
        needs_closure=True,
        needs_replicas=False,
        knobs=("lr", "gamma"),
        follow_up_knobs=("inner_lr",),
        settings=("inner_steps", "inner_lr", "noise", "mu_decay", "scale_by_gamma", *_COUPLING),
        color="tab:orange",
    ),
    OptimizerSpec(
        name="rsgd",
        optimizer=ReplicatedSGD,
        description="Replicated-SGD (num_replicas replicas coupled to their centre)",
        passes="num_replicas",
        minibatches=1,
        needs_closure=False,
        needs_replicas=True,
        knobs=("lr", "gamma"),
        follow_up_knobs=(),
        settings=("num_replicas", "coupling_every", "replica_init", "bn", *_COUPLING),
        color="tab:green",
    ),
    OptimizerSpec(
        name="sam",
        optimizer=SAM,
        description="SAM (an ascent step of radius rho, then the descent step)",
        passes=2,
        minibatches=1,
        needs_closure=True,
        needs_replicas=False,
        knobs=("lr", "rho"),
        follow_up_knobs=(),
        settings=("rho", "adaptive"),
        color="tab:red",
    ),
)

REGISTRY: Mapping[str, OptimizerSpec] = types.MappingProxyType({s.name: s for s in _SPECS})
"""name -> :class:`OptimizerSpec`, in the order every listing shows (read-only)."""


def optimizer_spec(name: str) -> OptimizerSpec:
    """The registry entry of ``name``.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).

    Example:
        >>> optimizer_spec("sam").passes_per_step({})
        2
    """
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown optimizer {name!r}; valid: {', '.join(REGISTRY)}") from None
