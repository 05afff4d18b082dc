"""Multi-pass gradient unscaling for :class:`torch.amp.GradScaler` (private helpers).

``GradScaler.unscale_`` may be called only once per optimizer per update, but Entropy-SGD and SAM
run several backward passes per step. These helpers unscale each pass themselves with the same
kernel the scaler uses, accumulate one ``found_inf`` flag per device over all passes, and hand
the flag to the scaler so that a single ``update()`` backs off (or grows) the scale once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor

__all__: list[str] = []


def new_found_inf(scaler: torch.amp.GradScaler) -> Tensor:
    """A zero flag on the scaler's device (the scaler must have been used to scale a loss)."""
    scale = scaler._scale  # noqa: SLF001 - same tensor GradScaler.unscale_ uses
    if scale is None:
        raise RuntimeError(
            "grad_scaler has no scale yet: the closure must backpropagate grad_scaler.scale(loss)"
        )
    return torch.zeros((), dtype=torch.float32, device=scale.device)


def unscale_(scaler: torch.amp.GradScaler, grads: list[Tensor], found_inf: Tensor) -> None:
    """Divide ``grads`` in place by the current scale; set ``found_inf`` to 1 on inf/nan.

    ``found_inf`` is only ever raised, so calling this once per pass accumulates the flag.
    """
    scale = scaler._scale  # noqa: SLF001
    if scale is None:
        raise RuntimeError(
            "grad_scaler has no scale yet: the closure must backpropagate grad_scaler.scale(loss)"
        )
    # Reciprocal in float64 like GradScaler.unscale_ (exact for powers of two).
    inv_scale = scale.double().reciprocal().float()
    by_device: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for g in grads:
        by_device[(g.device, g.dtype)].append(g)
    for (device, _), group in by_device.items():
        flag = found_inf if found_inf.device == device else found_inf.to(device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, inv_scale.to(device))
        if flag is not found_inf:
            found_inf.copy_(torch.maximum(found_inf, flag.to(found_inf.device)))


def unscale_pass(
    scaler: torch.amp.GradScaler | None,
    grads: Callable[[], list[Tensor]],
    found_inf: Tensor | None = None,
) -> Tensor | None:
    """Unscale one backward pass's gradients ``grads()``, accumulating the flag ``found_inf``.

    Returns the flag (a new one when ``found_inf`` is None, i.e. on a step's first pass), or
    None, having done nothing, when ``scaler`` is None or disabled.
    """
    if scaler is None or not scaler.is_enabled():
        return None
    if found_inf is None:
        found_inf = new_found_inf(scaler)
    unscale_(scaler, grads(), found_inf)
    return found_inf


def finish(
    scaler: torch.amp.GradScaler | None, optimizer: object, found_inf: Tensor | None
) -> None:
    """Record the accumulated flag for ``optimizer`` and update the scale once.

    A no-op when ``found_inf`` is None (no scaler in use: :func:`unscale_pass` returned None).
    """
    if scaler is None or found_inf is None:
        return
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states[id(optimizer)]  # noqa: SLF001
    state["found_inf_per_device"] = {found_inf.device: found_inf}
    state["stage"] = OptState.STEPPED
    scaler.update()
