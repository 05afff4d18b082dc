r"""Coupling schedules ("scoping") for ``group["gamma"]``.

Two forms of each schedule, as in optax and ``torch.optim.lr_scheduler``:

* plain callables of the step count, ``exponential_gamma(gamma0, growth=1e4, total_steps=T)(t)``;
* scheduler objects with the LR-scheduler contract (``step()``, ``state_dict()``,
  ``load_state_dict()``, ``get_last_gamma()``) that write ``group["gamma"]`` of every param
  group of an :class:`~flatminima.optim.EntropySGD` or :class:`~flatminima.optim.ReplicatedSGD`.

A scheduler sets the step-0 value on construction; each ``step()`` advances ``t`` by one (call it
once per optimizer step, or once per epoch, and count ``total_steps`` in the same unit).

Exponential scoping (Pittorino et al. 2021, arXiv 2006.07897, eq. for gamma_t):
:math:`\gamma_t = \min(\gamma_0 (1 + \gamma_1)^t, \gamma_{max})`, with
:math:`\gamma_1 = \mathrm{growth}^{1/T} - 1` when a total growth factor over ``T`` steps is given
(the authors grow gamma by ``1e4`` over training).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

from flatminima.optim._common import check_nonneg, check_positive

__all__ = [
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

Schedule = Callable[[int], float]


def _check_steps(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name} value: {value} (expected an int >= 1)")


def _resolve_gamma1(gamma1: float | None, growth: float | None, total_steps: int | None) -> float:
    if gamma1 is not None:
        if growth is not None:
            raise ValueError(f"give gamma1 or growth, not both (gamma1={gamma1}, growth={growth})")
        check_nonneg("gamma1", gamma1)
        return float(gamma1)
    if growth is None or total_steps is None:
        raise ValueError(
            f"exponential schedule needs gamma1, or growth and total_steps "
            f"(got gamma1={gamma1}, growth={growth}, total_steps={total_steps})"
        )
    check_positive("growth", growth)
    _check_steps("total_steps", total_steps)
    return growth ** (1.0 / total_steps) - 1.0


def constant_gamma(gamma: float) -> Schedule:
    """``t -> gamma``.

    Raises:
        ValueError: if ``gamma`` is negative or not finite.
    """
    check_nonneg("gamma", gamma)
    return lambda t: float(gamma)


def exponential_gamma(
    gamma0: float,
    growth: float | None = None,
    total_steps: int | None = None,
    gamma_max: float | None = None,
    *,
    gamma1: float | None = None,
) -> Schedule:
    r"""``t -> min(gamma0 * (1 + gamma1)^t, gamma_max)``.

    Args:
        gamma0: :math:`\gamma_0 >= 0`.
        growth: total growth factor over ``total_steps`` (then ``gamma1 = growth^(1/T) - 1``).
        total_steps: ``T`` (with ``growth``).
        gamma_max: optional cap.
        gamma1: the per-step rate :math:`\gamma_1 >= 0` (instead of ``growth``).

    Raises:
        ValueError: on invalid or inconsistent values.
    """
    check_nonneg("gamma0", gamma0)
    rate = _resolve_gamma1(gamma1, growth, total_steps)
    if gamma_max is not None:
        check_nonneg("gamma_max", gamma_max)

    def schedule(t: int) -> float:
        if gamma0 == 0.0:
            return 0.0
        try:
            g = gamma0 * (1.0 + rate) ** t
        except OverflowError:
            g = math.inf
        return g if gamma_max is None else min(g, float(gamma_max))

    return schedule


def linear_gamma(gamma0: float, gamma_final: float, total_steps: int) -> Schedule:
    """``t -> gamma0 + (gamma_final - gamma0) * min(t, T) / T``.

    Raises:
        ValueError: on invalid values.
    """
    check_nonneg("gamma0", gamma0)
    check_nonneg("gamma_final", gamma_final)
    _check_steps("total_steps", total_steps)
    return lambda t: gamma0 + (gamma_final - gamma0) * min(t, total_steps) / total_steps


def cosine_gamma(gamma0: float, gamma_final: float, total_steps: int) -> Schedule:
    """``t -> gamma0 + (gamma_final - gamma0) * (1 - cos(pi * min(t, T) / T)) / 2``.

    Raises:
        ValueError: on invalid values.
    """
    check_nonneg("gamma0", gamma0)
    check_nonneg("gamma_final", gamma_final)
    _check_steps("total_steps", total_steps)

    def schedule(t: int) -> float:
        frac = min(t, total_steps) / total_steps
        return gamma0 + (gamma_final - gamma0) * 0.5 * (1.0 - math.cos(math.pi * frac))

    return schedule


def auto_gamma0(loss: float, mean_sq_distance: float, *, ratio: float = 0.01) -> float:
    r"""Initial coupling that balances the coupling energy against the loss.

    Rule: :math:`\gamma_0` such that
    :math:`\frac{\gamma_0}{2}\,\overline{\|w_a - c\|^2} = \mathrm{ratio} \times E`, i.e.
    ``gamma0 = 2 * ratio * loss / mean_sq_distance``, where ``loss`` is the per-replica training
    loss at the start and ``mean_sq_distance`` is ``mean_a ||w_a - c||^2``
    (:meth:`Replicas.mean_sq_distance`). For Entropy-SGD pass ``||w' - x||^2`` after one inner
    sweep. Why this rule: the coupling's share of the objective is what decides whether the
    replicas move as one (coupling dominates) or independently (loss dominates); starting it at a
    small fixed fraction of the loss makes gamma0 independent of the width of the network and of
    the scale of the initialisation, and the exponential schedule then grows that share by
    ``growth`` over training. The default ``ratio=0.01`` starts the coupling at 1% of the loss.

    Raises:
        ValueError: if ``loss`` is negative, ``mean_sq_distance`` is not positive (e.g. replicas
            initialised the same), or ``ratio`` is not positive.
    """
    check_nonneg("loss", loss)
    check_positive("ratio", ratio)
    if not math.isfinite(mean_sq_distance) or mean_sq_distance <= 0.0:
        raise ValueError(
            f"Invalid mean_sq_distance value: {mean_sq_distance} (expected > 0; replicas "
            "initialised the same have zero distance, give gamma0 explicitly)"
        )
    return 2.0 * ratio * float(loss) / float(mean_sq_distance)


class GammaScheduler:
    """Base class: writes ``group["gamma"] = schedules[i](t)`` into every param group ``i``.

    Args:
        optimizer: an optimizer whose param groups have a ``gamma`` entry.
        schedules: one callable for all groups, or one per group.
        last_step: the step the optimizer is at (-1: start fresh, setting the step-0 value).

    Raises:
        ValueError: if a group has no ``gamma`` or the number of schedules does not match.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedules: Schedule | list[Schedule],
        last_step: int = -1,
    ) -> None:
        for i, group in enumerate(optimizer.param_groups):
            if "gamma" not in group:
                raise ValueError(f"param group {i} has no 'gamma' entry: not a coupled optimizer")
        if callable(schedules):
            schedules = [schedules] * len(optimizer.param_groups)
        if len(schedules) != len(optimizer.param_groups):
            raise ValueError(
                f"got {len(schedules)} schedules for {len(optimizer.param_groups)} param groups"
            )
        self.optimizer = optimizer
        self._schedules = list(schedules)
        self.last_step = last_step
        self.step()

    def gamma_at(self, t: int) -> list[float]:
        """The per-group gamma values at step ``t``."""
        return [float(s(t)) for s in self._schedules]

    def step(self) -> None:
        """Advance one step and write the new gamma into every param group."""
        self.last_step += 1
        for group, g in zip(self.optimizer.param_groups, self.gamma_at(self.last_step)):
            group["gamma"] = g
        self._last_gamma = [group["gamma"] for group in self.optimizer.param_groups]

    def get_last_gamma(self) -> list[float]:
        """The gamma values written by the last :meth:`step`."""
        return list(self._last_gamma)

    def state_dict(self) -> dict[str, Any]:
        """Everything except the optimizer and the (rebuilt) callables."""
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_schedules")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step count (the schedule itself comes from the constructor)."""
        self.__dict__.update(state_dict)


class ConstantGamma(GammaScheduler):
    """Constant coupling: ``gamma`` if given, else each group's current gamma."""

    def __init__(self, optimizer: Optimizer, gamma: float | None = None, last_step: int = -1):
        values = [g["gamma"] if gamma is None else gamma for g in optimizer.param_groups]
        super().__init__(optimizer, [constant_gamma(v) for v in values], last_step)


class ExponentialGamma(GammaScheduler):
    r"""Exponential scoping :math:`\gamma_t = \min(\gamma_0 (1 + \gamma_1)^t, \gamma_{max})`.

    See :func:`exponential_gamma` for the arguments (``growth`` over ``total_steps`` or
    ``gamma1``).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        gamma0: float,
        *,
        gamma1: float | None = None,
        growth: float | None = None,
        total_steps: int | None = None,
        gamma_max: float | None = None,
        last_step: int = -1,
    ) -> None:
        self.gamma1 = _resolve_gamma1(gamma1, growth, total_steps)
        fn = exponential_gamma(gamma0, gamma_max=gamma_max, gamma1=self.gamma1)
        super().__init__(optimizer, fn, last_step)


class _RampGamma(GammaScheduler):
    """A ramp from ``gamma0`` to ``gamma_final`` over ``total_steps``, then constant; a subclass
    names the ramp's shape in :meth:`ramp` (a schedule factory with the arguments of
    :func:`linear_gamma`)."""

    @staticmethod
    def ramp(gamma0: float, gamma_final: float, total_steps: int) -> Schedule:
        raise NotImplementedError  # set by each subclass

    def __init__(
        self,
        optimizer: Optimizer,
        gamma0: float,
        gamma_final: float,
        total_steps: int,
        last_step: int = -1,
    ) -> None:
        super().__init__(optimizer, type(self).ramp(gamma0, gamma_final, total_steps), last_step)


class LinearGamma(_RampGamma):
    """Linear ramp from ``gamma0`` to ``gamma_final`` over ``total_steps``, then constant."""

    ramp = staticmethod(linear_gamma)


class CosineGamma(_RampGamma):
    """Half-cosine ramp from ``gamma0`` to ``gamma_final`` over ``total_steps``, then constant."""

    ramp = staticmethod(cosine_gamma)
