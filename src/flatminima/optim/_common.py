"""Shared validation, the torch-SGD base step and the pass counter (private helpers)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__: list[str] = []


class PassCounter:
    """Mixin of the package's optimizers: the pass counter by its unit's name, the live gradients.

    The optimizer keeps ``grad_evals``, the backward passes of one minibatch so far (one pass =
    one forward and backward of one minibatch through one model copy); :attr:`passes` reads it.
    """

    grad_evals: int
    param_groups: list[dict[str, Any]]

    @property
    def passes(self) -> int:
        """Backward passes of one minibatch so far: :attr:`grad_evals` by its unit's name
        (read-only; samples through backward = passes x batch size)."""
        return self.grad_evals

    def _grads(self) -> list[Tensor]:
        """The gradients present in the param groups (what a ``GradScaler`` unscales)."""
        return [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]


def check_nonneg(name: str, value: float) -> None:
    """Raise ``ValueError("Invalid <name> value: <value>")`` unless ``value`` is finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name} value: {value!r} (expected a non-negative number)")
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"Invalid {name} value: {value} (expected a finite number >= 0)")


def check_positive(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value`` is finite and > 0."""
    check_nonneg(name, value)
    if value == 0.0:
        raise ValueError(f"Invalid {name} value: {value} (expected a finite number > 0)")


def check_sgd_args(lr: float, momentum: float, weight_decay: float, nesterov: bool) -> None:
    """The checks of ``torch.optim.SGD`` (dampening is always 0 here)."""
    check_nonneg("learning rate", lr)
    check_nonneg("momentum", momentum)
    check_nonneg("weight_decay", weight_decay)
    if nesterov and momentum <= 0.0:
        raise ValueError(
            f"Invalid nesterov value: Nesterov momentum requires momentum > 0, got {momentum}"
        )


def add_coupling_(grad: Tensor, w: Tensor, total: Tensor, kg: float, wd: float, count: int) -> None:
    """``grad += kg (w - total / count) + wd w`` in two in-place kernels.

    ``total / count`` is the replica centre ``c`` (``total`` a sum of replica parameters, from
    ``w.sum(0)`` or an all-reduce); the ``1/count`` is folded into the kernel's ``alpha``. The
    single-process and the distributed Replicated-SGD both call this, so they agree bit for bit.
    """
    grad.add_(w, alpha=kg + wd)
    grad.sub_(total, alpha=kg / count)


def sgd_step_(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
) -> list[Tensor | None]:
    """One ``torch.optim.SGD`` step (dampening 0) with the same elementwise operations.

    ``grads`` may be modified in place (they are scratch tensors owned by the caller). Returns the
    momentum buffers (created on the first call by cloning the gradient, as torch does).
    """
    if not params:
        return bufs
    if weight_decay != 0.0:
        torch._foreach_add_(grads, params, alpha=weight_decay)
    if momentum != 0.0:
        if all(b is None for b in bufs):
            bufs = [g.detach().clone() for g in grads]
        elif any(b is None for b in bufs):  # parameters added after the first step
            new_bufs: list[Tensor | None] = []
            for g, b in zip(grads, bufs):
                if b is None:
                    new_bufs.append(g.detach().clone())
                else:
                    new_bufs.append(b.mul_(momentum).add_(g))
            bufs = new_bufs
        else:
            torch._foreach_mul_(bufs, momentum)  # type: ignore[arg-type]
            torch._foreach_add_(bufs, grads)  # type: ignore[arg-type]
        if nesterov:
            torch._foreach_add_(grads, bufs, alpha=momentum)  # type: ignore[arg-type]
            update = grads
        else:
            update = bufs  # type: ignore[assignment]
    else:
        update = grads
    torch._foreach_add_(params, update, alpha=-lr)
    return bufs


def group_with_defaults(param_group: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A new param group's values with the optimizer's ``defaults`` filled in, for checking.

    ``param_group["params"]`` is made a list in place when it is an iterator (so that it survives
    the check); a lone tensor stays as given, and is a one-element list in the returned copy.
    """
    params = param_group["params"]
    if not isinstance(params, (Tensor, set)):
        param_group["params"] = list(params)  # a generator must survive the check
    merged = {**defaults, **param_group}
    if isinstance(params, Tensor):
        merged["params"] = [params]
    return merged


def check_optimizer_class(name: str, cls: object) -> None:
    """Raise ``TypeError`` unless ``cls`` is a ``torch.optim.Optimizer`` class (not an instance)."""
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"{name} must be a torch.optim.Optimizer class, got {cls!r}")


def check_base_group(base_cls: type[torch.optim.Optimizer], group: dict) -> None:
    """Run ``base_cls``'s constructor checks on one param group's hyperparameters.

    ``torch.optim`` validates only the constructor's defaults, never a group added later (a group
    with ``lr=-1`` is accepted). This builds a throw-away ``base_cls`` over one scalar parameter
    with the group's values for the constructor's keyword arguments, so a bad value raises the
    base optimizer's own error before the group is appended anywhere.

    Raises:
        ValueError, TypeError: the base optimizer's error, prefixed with the class name.
    """
    import inspect

    sig = inspect.signature(base_cls.__init__)
    names = {
        n for n, p in sig.parameters.items()
        if n not in ("self", "params")
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }  # fmt: skip
    kwargs = {k: v for k, v in group.items() if k in names}
    params = group.get("params") or []
    first = params[0] if isinstance(params, (list, tuple)) and params else None
    like = first if isinstance(first, Tensor) else torch.zeros(())
    dummy = torch.zeros(1, dtype=like.dtype, device=like.device, requires_grad=True)
    try:
        base_cls([dummy], **kwargs)
    except (ValueError, TypeError) as err:
        raise type(err)(f"Invalid param group for {base_cls.__name__}: {err}") from err
