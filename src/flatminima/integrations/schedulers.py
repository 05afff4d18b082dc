"""Coupling schedules as ``torch.optim.lr_scheduler.LRScheduler`` objects.

Trainers accept only LR-scheduler-like objects: Lightning's ``configure_optimizers`` refuses any
scheduler that is not an ``LRScheduler`` (unless ``lr_scheduler_step`` is overridden), and
Hugging Face callbacks step once per optimizer step. :class:`GammaLR` wraps a
:class:`~flatminima.optim.schedules.GammaScheduler` so it fits both; it never touches
``group["lr"]``.
"""

from __future__ import annotations

from typing import Any

from torch.optim.lr_scheduler import LRScheduler

from flatminima.integrations._common import unwrap_optimizer
from flatminima.optim import EntropySGD
from flatminima.optim.schedules import GammaScheduler

__all__ = ["GammaLR", "advance_gamma"]

_UNITS = ("auto", "step", "outer")


def _resolve_unit(gamma_scheduler: GammaScheduler, unit: str) -> str:
    if unit not in _UNITS:
        raise ValueError(f"Invalid unit value: {unit!r} (expected one of {_UNITS})")
    if unit == "auto":
        is_esgd = isinstance(unwrap_optimizer(gamma_scheduler.optimizer), EntropySGD)
        return "outer" if is_esgd else "step"
    if unit == "outer" and not hasattr(unwrap_optimizer(gamma_scheduler.optimizer), "outer_steps"):
        raise ValueError("unit='outer' needs an optimizer with outer steps (EntropySGD)")
    return unit


def advance_gamma(gamma_scheduler: GammaScheduler, unit: str) -> None:
    """Advance ``gamma_scheduler`` after one optimizer step, in ``unit``.

    ``"step"``: one schedule step per call. ``"outer"``: the schedule's step count follows the
    optimizer's ``outer_steps`` (Entropy-SGD with ``one_batch_per_step=True``, where an optimizer
    step is one Langevin step and ``gamma_t`` is indexed by outer steps as in the closure form,
    so the coupling changes only between outer steps).
    """
    if unit == "step":
        gamma_scheduler.step()
        return
    target = unwrap_optimizer(gamma_scheduler.optimizer).outer_steps
    while gamma_scheduler.last_step < target:
        gamma_scheduler.step()


class GammaLR(LRScheduler):
    r"""A :class:`~flatminima.optim.schedules.GammaScheduler` with the ``LRScheduler`` type.

    ``step()`` advances the coupling schedule (``group["gamma"]``); learning rates are left
    alone (``get_last_lr()`` reports them). ``state_dict()`` carries the schedule's step count.

    Args:
        gamma_scheduler: e.g. ``ExponentialGamma(opt, 1e-2, growth=100, total_steps=T)``.
        unit: ``"step"``: each ``step()`` is one schedule step; ``"outer"``: the schedule follows
            the optimizer's ``outer_steps`` (for Entropy-SGD in one-batch-per-step mode, count
            ``total_steps`` in outer steps); ``"auto"`` (default): ``"outer"`` for
            :class:`~flatminima.optim.EntropySGD`, else ``"step"``.

    Raises:
        TypeError: if ``gamma_scheduler`` is not a ``GammaScheduler``.
        ValueError: on an unknown ``unit``.

    Example:
        >>> import torch
        >>> from flatminima.optim import Replicas, ReplicatedSGD
        >>> from flatminima.optim.schedules import ExponentialGamma
        >>> reps = Replicas(lambda: torch.nn.Linear(2, 1), 2, seed=0)
        >>> opt = ReplicatedSGD(reps, lr=0.1, gamma=1e-2)
        >>> sched = GammaLR(ExponentialGamma(opt, 1e-2, gamma1=1.0))
        >>> sched.step()
        >>> opt.param_groups[0]["gamma"], sched.get_last_lr()
        (0.02, [0.1])
    """

    def __init__(self, gamma_scheduler: GammaScheduler, unit: str = "auto") -> None:
        if not isinstance(gamma_scheduler, GammaScheduler):
            raise TypeError(
                f"GammaLR wraps a flatminima GammaScheduler, got {type(gamma_scheduler).__name__}"
            )
        # LRScheduler.__init__ is not called on purpose: it would write group["lr"] and take an
        # initial step; the gamma scheduler already set its step-0 value.
        self.gamma_scheduler = gamma_scheduler
        self.unit = _resolve_unit(gamma_scheduler, unit)
        self.optimizer = gamma_scheduler.optimizer
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.last_epoch = 0
        self._last_lr = list(self.base_lrs)

    def get_lr(self) -> list[Any]:
        """The current learning rates (unchanged by this scheduler)."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def step(self, epoch: int | None = None) -> None:
        """Advance the coupling schedule by one optimizer step (``epoch`` is not supported).

        Raises:
            TypeError: if ``epoch`` is given.
        """
        if epoch is not None:
            raise TypeError("GammaLR.step() takes no epoch argument")
        advance_gamma(self.gamma_scheduler, self.unit)
        self.last_epoch += 1
        self._last_lr = self.get_lr()

    def get_last_gamma(self) -> list[float]:
        """The per-group gamma values written by the last step."""
        return self.gamma_scheduler.get_last_gamma()

    def state_dict(self) -> dict[str, Any]:
        """The wrapped schedule's state and this adapter's step count."""
        return {
            "gamma_scheduler": self.gamma_scheduler.state_dict(),
            "unit": self.unit,
            "last_epoch": self.last_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.gamma_scheduler.load_state_dict(state_dict["gamma_scheduler"])
        self.unit = state_dict["unit"]
        self.last_epoch = int(state_dict["last_epoch"])
        self._last_lr = self.get_lr()
