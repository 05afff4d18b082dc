"""Framework-free helpers shared by the Lightning and Hugging Face integrations (private)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from flatminima.optim import SAM, EntropySGD, ReplicatedModule, ReplicatedSGD

__all__ = [
    "check_optimizer",
    "eval_state_dicts",
    "evaluation_weights",
    "unwrap_optimizer",
]

logger = logging.getLogger(__name__)

_FLATMINIMA = (EntropySGD, SAM, ReplicatedSGD)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside framework wrappers.

    Follows ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``, :class:`~flatminima.integrations.hf.SAMTwoCall`) until a flatminima
    optimizer or an object without an inner optimizer is reached.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> unwrap_optimizer(opt) is opt
        True
    """
    for _ in range(16):  # wrappers nest a few levels at most
        if isinstance(optimizer, _FLATMINIMA):
            return optimizer
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            return optimizer
        optimizer = inner
    return optimizer


@contextlib.contextmanager
def evaluation_weights(*optimizers: Any) -> Iterator[None]:
    """Inside the block the model holds the weights to evaluate and checkpoint.

    For every :class:`~flatminima.optim.EntropySGD` among ``optimizers`` (wrappers are
    unwrapped) this is its anchor ``x`` (:meth:`EntropySGD.anchor_weights`): in the middle of an
    outer step the parameters hold the Langevin walker ``w' = x + delta``, which is not the
    network being trained. Other optimizers need nothing here (a
    :class:`~flatminima.optim.ReplicatedModule` in eval mode already runs its centre). The
    training state is restored bit for bit on exit.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> with evaluation_weights(opt):
        ...     out = net(torch.ones(1, 2))
    """
    with contextlib.ExitStack() as stack:
        for opt in optimizers:
            inner = unwrap_optimizer(opt)
            if isinstance(inner, EntropySGD):
                stack.enter_context(inner.anchor_weights())
        yield


def check_optimizer(optimizer: Any, framework: str) -> None:
    """Refuse set-ups that would train silently wrong inside ``framework``'s loop.

    Raises:
        ValueError: for an :class:`EntropySGD` without ``one_batch_per_step=True`` (the
            framework calls ``step(closure)`` once per batch: the closure form would re-run the
            same batch ``inner_steps`` times), or for a :class:`ReplicatedSGD` whose flat buffers
            are no longer the replicas' (the module was moved after the optimizer was built).
    """
    inner = unwrap_optimizer(optimizer)
    if isinstance(inner, EntropySGD) and not getattr(inner, "one_batch_per_step", False):
        raise ValueError(
            f"EntropySGD(one_batch_per_step=False) inside {framework}: the framework calls step() "
            "once per batch, so each Langevin step would re-use that batch "
            f"{inner.inner_steps} times; build it with one_batch_per_step=True (every step() is "
            "one Langevin step on the current batch, every inner_steps-th also the outer update)"
        )
    if isinstance(inner, ReplicatedSGD):
        current = {id(t) for t in inner.replicas.flat_params}
        held = [p for g in inner.param_groups for p in g["params"]]
        if any(id(p) not in current for p in held):
            raise ValueError(
                f"ReplicatedSGD inside {framework} holds flat buffers that its replicas no longer "
                "use (the module was moved or cast after the optimizer was built): build the "
                "optimizer after moving the model"
            )


def warn_sam_batchnorm(optimizer: Any, model: nn.Module) -> None:
    """Log a warning if a :class:`SAM` without ``model`` trains a network with BatchNorm."""
    inner = unwrap_optimizer(optimizer)
    if not isinstance(inner, SAM) or inner.model is not None:
        return
    if any(isinstance(m, _BatchNorm) for m in model.modules()):
        logger.warning(
            "SAM was built without model=...: the BatchNorm running statistics are updated by "
            "both passes (give model=<the network> to keep the first pass's only)"
        )


@torch.no_grad()
def eval_state_dicts(model: nn.Module, optimizers: list[Any]) -> dict[str, dict[str, Tensor]]:
    """Copies of the evaluation weights, for a checkpoint beside the training state.

    Returns:
        ``{"model": state dict under :func:`evaluation_weights`}``, plus
        ``{"center/<name>": centre state dict}`` for every
        :class:`~flatminima.optim.ReplicatedModule` inside ``model`` (``<name>`` is its module
        path, ``""`` for ``model`` itself).
    """
    with evaluation_weights(*optimizers):
        out = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    for name, mod in model.named_modules():
        if isinstance(mod, ReplicatedModule):
            center = mod.center()
            out[f"center/{name}"] = {k: v.detach().clone() for k, v in center.state_dict().items()}
    return out


def flatminima_optimizers(optimizers: list[Optimizer] | tuple[Any, ...]) -> list[Any]:
    """The flatminima optimizers among ``optimizers`` (unwrapped)."""
    return [o for o in map(unwrap_optimizer, optimizers) if isinstance(o, _FLATMINIMA)]
