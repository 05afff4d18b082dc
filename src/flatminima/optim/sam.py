"""Sharpness-Aware Minimization (SAM) and adaptive SAM (ASAM), the flat-minima baseline.

References: P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur, "Sharpness-Aware Minimization for
Efficiently Improving Generalization", ICLR 2021 (arXiv 2010.01412); J. Kwon, J. Kim, H. Park,
I. K. Choi, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep
Neural Networks", ICML 2021 (arXiv 2102.11600). API after github.com/davda54/sam, with base
optimizer state in checkpoints, BatchNorm statistics from the first pass only, and AMP support.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from flatminima.optim import _amp
from flatminima.optim._common import (
    PassCounter,
    check_base_group,
    check_nonneg,
    check_optimizer_class,
    group_with_defaults,
)

__all__ = ["SAM", "disable_running_stats", "enable_running_stats"]

logger = logging.getLogger(__name__)

_SAVED = "_flatminima_saved_track_running_stats"

_NO_CLOSURE = (
    "SAM.step() needs a closure: it runs forward and backward twice (at w and at w + e). "
    "Without a closure use the two-call protocol: loss_fn(model(x), y).backward(); "
    "opt.first_step(zero_grad=True); loss_fn(model(x), y).backward() (same batch, BatchNorm "
    "statistics frozen with disable_running_stats(model)); opt.second_step(zero_grad=True)"
)
_FOREIGN = ("entropy_sgd", "replicated_sgd")
_IMPL_FLAGS = (
    "foreach",
    "maximize",
    "capturable",
    "differentiable",
    "fused",
    "decoupled_weight_decay",
)


class _RunningStatsGuard:
    """Returned by :func:`disable_running_stats`; leaving a ``with`` block re-enables them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> _RunningStatsGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        enable_running_stats(self.model)


def disable_running_stats(model: nn.Module) -> _RunningStatsGuard:
    """Stop the BatchNorm layers of ``model`` that are in training mode from updating their
    running statistics (they still normalise with the batch statistics, as in training).

    Works as a call (undo with :func:`enable_running_stats`) or as a context manager::

        with disable_running_stats(model):
            loss_fn(model(x), y).backward()      # second SAM pass: statistics untouched

    Implemented by switching ``track_running_stats`` off for the pass, which leaves the buffers
    (``num_batches_tracked`` included) bit-for-bit unchanged.
    """
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.training and not hasattr(m, _SAVED):
            setattr(m, _SAVED, m.track_running_stats)
            m.track_running_stats = False
    return _RunningStatsGuard(model)


def enable_running_stats(model: nn.Module) -> None:
    """Undo :func:`disable_running_stats`."""
    for m in model.modules():
        if isinstance(m, _BatchNorm) and hasattr(m, _SAVED):
            m.track_running_stats = getattr(m, _SAVED)
            delattr(m, _SAVED)


class SAM(Optimizer, PassCounter):
    r"""SAM / ASAM wrapped around any base optimizer.

    With ``g = grad E(w)`` from the first pass and, per group, ``rho`` and ``T = |w|`` if
    ``adaptive`` else ``T = 1``::

        e = rho * T^2 g / ||T g||          (the norm runs over all parameters of all groups)
        w <- w + e ; g_sam = grad E(w + e) ; w <- w - e (restored exactly from a copy)
        base_optimizer.step() with gradient g_sam

    Cost: 2 backward passes per step (:attr:`grad_evals`). With ``rho=0`` the step is
    exactly the base optimizer's step.

    Two ways to drive it, equal bit for bit on the same minibatch:

    * ``step(closure)``: the closure (zero grads, forward, backward, return loss) runs twice.
    * the two-call protocol of github.com/davda54/sam, for loops and frameworks without a
      closure::

          loss_fn(model(x), y).backward()           # gradient at w
          opt.first_step(zero_grad=True)            # w <- w + e
          with disable_running_stats(model):        # BatchNorm statistics from the first pass
              loss_fn(model(x), y).backward()       # gradient at w + e, same minibatch
          opt.second_step(zero_grad=True)           # w <- w, base step with that gradient

    A closure that raises in either pass leaves the weights as they were before the step.

    Args:
        params: parameters or param-group dicts (``rho``/``adaptive`` may differ per group).
        base_optimizer: an optimizer class (e.g. ``torch.optim.SGD``), built on the same param
            groups with ``base_kwargs``.
        rho: neighbourhood radius :math:`\rho >= 0`.
        adaptive: ASAM (scale-invariant ``|w|`` scaling).
        model: if given, :meth:`step` freezes its BatchNorm running statistics during the second
            pass, so they come from the first pass only.
        **base_kwargs: hyperparameters of the base optimizer (``lr``, ``momentum``, ...).

    Raises:
        ValueError: on a negative or non-finite ``rho``, or a hyperparameter the base optimizer
            rejects (in any param group).
        TypeError: if ``base_optimizer`` is not an optimizer class.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=model)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = model(torch.ones(4, 3)).pow(2).mean()
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
        >>> opt.grad_evals
        2

        The same step with the two-call protocol:

        >>> model(torch.ones(4, 3)).pow(2).mean().backward()
        >>> opt.first_step(zero_grad=True)
        >>> with disable_running_stats(model):
        ...     model(torch.ones(4, 3)).pow(2).mean().backward()
        >>> opt.second_step(zero_grad=True)
        >>> opt.grad_evals
        4
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_nonneg("rho", rho)
        check_optimizer_class("base_optimizer", base_optimizer)
        self._base_cls = base_optimizer
        defaults = dict(rho=rho, adaptive=adaptive, **base_kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.model = model
        self.grad_evals = 0  # backward passes of one minibatch (alias: passes)
        self._backup: list[tuple[Tensor, Tensor]] | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to SAM and to the base optimizer, validated BEFORE it is appended.

        Raises:
            ValueError: on a bad ``rho`` or a value the base optimizer rejects (e.g. ``lr=-1``);
                ``param_groups`` is then unchanged.
        """
        merged = group_with_defaults(param_group, self.defaults)
        check_nonneg("rho", merged["rho"])
        check_base_group(self._base_cls, merged)
        if hasattr(self, "base_optimizer"):
            for key in ("rho", "adaptive"):
                param_group.setdefault(key, self.defaults[key])
            self.base_optimizer.add_param_group(param_group)
        else:
            super().add_param_group(param_group)

    @torch.no_grad()
    def _grad_norm(self) -> Tensor:
        norms: list[Tensor] = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            gs: list[Tensor] | tuple[Tensor, ...] = [p.grad for p in ps]
            if group["adaptive"]:
                gs = torch._foreach_mul(gs, torch._foreach_abs(ps))
            norms.extend(torch._foreach_norm(gs))
        if not norms:
            return torch.zeros(())
        device = norms[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to ``w + e`` using the gradients in ``.grad`` (remembering ``w`` exactly)."""
        if self._backup is not None:
            raise RuntimeError("first_step() called twice without second_step()")
        norm = self._grad_norm()
        backup: list[tuple[Tensor, Tensor]] = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            backup.extend((p, p.detach().clone()) for p in ps)
            if group["rho"] == 0.0:
                continue
            scale = group["rho"] / (norm.to(ps[0].device) + 1e-12)
            e = torch._foreach_mul([p.grad for p in ps], scale)
            if group["adaptive"]:
                sq = torch._foreach_mul(ps, ps)
                torch._foreach_mul_(e, sq)
            torch._foreach_add_(ps, e)
        self._backup = backup
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> bool:
        """Put back the weights saved by :meth:`first_step` (no base step).

        Returns:
            True if weights were put back, False if nothing was saved (then it does nothing).
        """
        if self._backup is None:
            return False
        ps = [p for p, _ in self._backup]
        if ps:
            torch._foreach_copy_(ps, [b for _, b in self._backup])
        self._backup = None
        return True

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` and take the base optimizer's step with the gradients at ``w + e``.

        Raises:
            RuntimeError: without a :meth:`first_step` before it.
        """
        if self._backup is None:
            raise RuntimeError("second_step() called without first_step()")
        self.restore()
        self.base_optimizer.step()
        self.grad_evals += 2
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> Any:
        """Full SAM step; the closure (zero grads, forward, backward, return loss) runs twice.

        Args:
            closure: required; with a ``grad_scaler`` it must backpropagate
                ``grad_scaler.scale(loss)``.
            grad_scaler: optional ``torch.amp.GradScaler``: each pass is unscaled; an inf/nan in
                either pass skips the step (weights restored) and the scale is updated once.

        Returns:
            The loss of the first pass.

        Raises:
            TypeError: if ``closure`` is None (the message shows the two-call protocol).
        """
        if closure is None:
            raise TypeError(_NO_CLOSURE)
        with torch.enable_grad():
            loss = closure()
        found_inf = _amp.unscale_pass(grad_scaler, self._grads)
        if found_inf is not None and found_inf.item() != 0.0:
            logger.debug("SAM: inf/nan gradient in the first pass, skipping the step")
            self.grad_evals += 1
            _amp.finish(grad_scaler, self, found_inf)
            return loss
        self.first_step(zero_grad=True)
        guard = disable_running_stats(self.model) if self.model is not None else None
        try:
            with torch.enable_grad():
                closure()
        except BaseException:
            self.restore()  # a failing second pass leaves the weights at w
            raise
        finally:
            if guard is not None:
                enable_running_stats(self.model)  # type: ignore[arg-type]
        found_inf = _amp.unscale_pass(grad_scaler, self._grads, found_inf)
        if found_inf is not None and found_inf.item() != 0.0:
            logger.debug("SAM: inf/nan gradient in the second pass, skipping the step")
            self.restore()
            self.grad_evals += 2
            _amp.finish(grad_scaler, self, found_inf)
            return loss
        self.second_step()
        _amp.finish(grad_scaler, self, found_inf)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients (delegates to the base optimizer)."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (groups carry ``rho``/``adaptive``) plus counters."""
        sd = self.base_optimizer.state_dict()
        sd["sam"] = {"grad_evals": self.grad_evals}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the base optimizer and re-share its param groups.

        Raises:
            ValueError: if ``state_dict`` is not a SAM state dict over this base optimizer (an
                EntropySGD or plain SGD state, say); nothing is changed then.
        """
        sd = dict(state_dict)
        extra = sd.pop("sam", None)
        self._validate_state_dict(sd)
        self.base_optimizer.load_state_dict(sd)
        self.param_groups = self.base_optimizer.param_groups
        if extra is not None:
            self.grad_evals = int(extra["grad_evals"])

    def _validate_state_dict(self, sd: dict[str, Any]) -> None:
        """Refuse another optimizer's state dict with a ValueError naming what is wrong."""
        foreign = [k for k in _FOREIGN if k in sd]
        if foreign:
            raise ValueError(
                f"SAM.load_state_dict: the state dict has {foreign}: it was saved by another "
                "optimizer, not SAM"
            )
        flags = ("params", *_IMPL_FLAGS)  # torch adds these with defaults when missing
        need = ["rho", "adaptive", *(k for k in self.base_optimizer.defaults if k not in flags)]
        for i, group in enumerate(sd.get("param_groups", [])):
            missing = [k for k in need if k not in group]
            if missing:
                raise ValueError(
                    f"SAM.load_state_dict: param group {i} lacks {missing}: not a state dict of "
                    f"SAM over {type(self.base_optimizer).__name__}"
                )
