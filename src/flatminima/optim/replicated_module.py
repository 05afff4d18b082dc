"""Replicated-SGD in any training loop: an ``nn.Module`` that holds ``y`` replicas.

:class:`ReplicatedModule` turns one batch of ``y * B`` samples into ``y`` minibatches of ``B``
(replica ``a`` gets chunk ``a``) and combines the replicas' outputs so that the loss a plain loop,
Lightning or the Hugging Face Trainer computes on them gives every replica the gradient of its
own minibatch loss. Then ``loss.backward(); opt.step()`` with a
:class:`~flatminima.optim.ReplicatedSGD` built on the module is Replicated-SGD.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flatminima.optim.replicated import Replicas

__all__ = ["ReplicatedModule"]

logger = logging.getLogger(__name__)


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def _split(obj: Any, y: int, where: str, sizes: set[int]) -> list[Any]:
    """``y`` per-replica versions of ``obj``: tensors (dim >= 1) cut into equal dim-0 chunks."""
    if isinstance(obj, Tensor) and obj.dim() >= 1:
        n = obj.shape[0]
        if n % y:
            raise ValueError(
                f"ReplicatedModule: {where} has batch size {n}, which is not divisible by "
                f"num_replicas={y} (one batch of y*B samples is split into y minibatches of B)"
            )
        sizes.add(n // y)
        return list(torch.split(obj, n // y))
    if isinstance(obj, Mapping):
        parts = {k: _split(v, y, f"{where}[{k!r}]", sizes) for k, v in obj.items()}
        return [_rebuild(obj, {k: p[a] for k, p in parts.items()}) for a in range(y)]
    if isinstance(obj, (list, tuple)):
        parts_l = [_split(v, y, f"{where}[{i}]", sizes) for i, v in enumerate(obj)]
        return [_rebuild(obj, [p[a] for p in parts_l]) for a in range(y)]
    return [obj] * y


def _rebuild(like: Any, items: Any) -> Any:
    """A container of ``like``'s type holding ``items`` (dict of values or list of values)."""
    if isinstance(like, Mapping):
        try:
            return type(like)(**items) if dataclasses.is_dataclass(like) else type(like)(items)  # type: ignore[call-arg]
        except TypeError:
            return dict(items)
    if isinstance(like, tuple) and hasattr(like, "_fields"):  # namedtuple
        return type(like)(*items)
    if isinstance(like, (list, tuple)):
        return type(like)(items)
    return dataclasses.replace(like, **items)


def _combine(outs: list[Any], sizes: set[int]) -> Any:
    """Combine the replicas' outputs (see :class:`ReplicatedModule`)."""
    first = outs[0]
    y = len(outs)
    if isinstance(first, Tensor):
        if first.dim() == 0:  # a loss the replica computed itself: sum (rSGD objective)
            total = first
            for o in outs[1:]:
                total = total + o
            return total
        if first.shape[0] in sizes and all(o.shape[0] == first.shape[0] for o in outs):
            cat = torch.cat(outs)
            return _ScaleGrad.apply(cat, float(y)) if cat.requires_grad else cat
        return torch.stack(outs)
    if isinstance(first, Mapping):
        return _rebuild(first, {k: _combine([o[k] for o in outs], sizes) for k in first})
    if isinstance(first, (list, tuple)):
        return _rebuild(first, [_combine(list(v), sizes) for v in zip(*outs)])
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        fields = [f.name for f in dataclasses.fields(first) if f.init]
        return _rebuild(first, {n: _combine([getattr(o, n) for o in outs], sizes) for n in fields})
    try:
        if all(o == first for o in outs[1:]):
            return first
    except Exception:  # noqa: BLE001 - objects whose == is not a bool: keep all of them
        logger.debug("ReplicatedModule: outputs of type %s kept as a list", type(first))
    return list(outs)


class ReplicatedModule(nn.Module):
    r"""``y`` replicas of a network behind one ``forward``, for rSGD in external training loops.

    Training mode: ``forward(*args, **kwargs)`` splits every tensor argument (also inside dicts,
    lists and tuples; dim >= 1) along dim 0 into ``y`` equal chunks, runs replica ``a`` on chunk
    ``a`` (non-tensor arguments are passed to every replica) and combines the outputs:

    * per-sample tensors (dim 0 = the chunk size ``B``) are concatenated along dim 0 through an
      identity whose backward multiplies the gradient by ``y``. A batch-MEAN loss over the
      concatenated output, :math:`L = \frac{1}{yB}\sum_a\sum_{i\in B_a} \ell_i
      = \frac{1}{y}\sum_a L_a`, then gives replica ``a`` exactly :math:`\nabla L_a(w_a)`, the
      gradient of its own minibatch-mean loss: the rSGD objective :math:`\sum_a L_a(w_a)`
      (the loss VALUE is the replicas' average :math:`\frac{1}{y}\sum_a L_a`);
    * 0-dim tensors (a loss the replica computed itself, as Hugging Face models do when given
      ``labels``) are summed over the replicas: the returned loss is :math:`\sum_a L_a`;
    * other tensors are stacked to ``[y, ...]``; dicts, tuples, named tuples and dataclasses
      (``ModelOutput``) are combined entry by entry; equal non-tensor values are returned once.

    Eval mode: ``forward`` runs the centre network (parameters = replica mean, BatchNorm
    statistics averaged: :meth:`Replicas.center`), refreshed whenever the replicas changed.

    Budget: one batch of ``y * B`` samples is ``y`` minibatches of ``B``, i.e. ``y`` gradient
    evaluations (counted by ``ReplicatedSGD.grad_evals``), as ``y`` SGD steps at batch ``B``.
    ``state_dict()`` holds the replicas (a checkpoint restores all of them).

    Args:
        model_or_replicas: a :class:`Replicas` container, or what :class:`Replicas` takes (a
            module or a zero-argument factory).
        num_replicas: ``y`` (required unless a :class:`Replicas` is given).
        init, seed: as in :class:`Replicas` (only when building the replicas here).

    Raises:
        ValueError: on a bad ``num_replicas``, ``init`` or ``seed``; in ``forward``, on a batch
            size not divisible by ``y``.

    Example:
        >>> from flatminima.optim import ReplicatedSGD
        >>> net = ReplicatedModule(lambda: torch.nn.Linear(4, 3), 2, seed=0)
        >>> opt = ReplicatedSGD(net, lr=0.1, gamma=1e-2)
        >>> x, t = torch.randn(8, 4), torch.randint(0, 3, (8,))  # y * B = 2 * 4
        >>> loss = torch.nn.functional.cross_entropy(net(x), t)
        >>> loss.backward()
        >>> opt.step()
        >>> opt.grad_evals
        2
        >>> net.eval()(x).shape  # the centre network
        torch.Size([8, 3])
    """

    def __init__(
        self,
        model_or_replicas: Replicas | nn.Module | Callable[[], nn.Module],
        num_replicas: int | None = None,
        init: str = "independent",
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(model_or_replicas, Replicas):
            y = len(model_or_replicas)
            if num_replicas is not None and num_replicas != y:
                raise ValueError(
                    f"Invalid num_replicas value: {num_replicas} (the Replicas given hold {y})"
                )
            if init != "independent" or seed is not None:
                raise ValueError("init and seed apply only when ReplicatedModule builds replicas")
            reps = model_or_replicas
        else:
            if num_replicas is None:
                raise ValueError("num_replicas is required unless a Replicas container is given")
            reps = Replicas(model_or_replicas, num_replicas, init, seed=seed)
        self.replicas = reps
        self.__dict__["_center_key"] = None

    @property
    def num_replicas(self) -> int:
        """``y``."""
        return len(self.replicas)

    def _state_key(self) -> tuple[Any, ...]:
        """Changes whenever a replica parameter or buffer is written (version counters)."""
        tensors = [*self.replicas.flat_params, *self.replicas.parameters()]
        tensors += list(self.replicas.buffers())
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def center(self) -> nn.Module:
        """The centre network (see :meth:`Replicas.center`), refreshed now."""
        c = self.replicas.center()
        self.__dict__["_center_key"] = self._state_key()
        return c

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Training: replica ``a`` on chunk ``a``, outputs combined; eval: the centre."""
        if not self.training:
            cache = self.replicas.__dict__.get("_center_cache")
            if cache is None or self.__dict__["_center_key"] != self._state_key():
                cache = self.center()
            return cache(*args, **kwargs)
        y = len(self.replicas)
        sizes: set[int] = set()
        split_args = _split(list(args), y, "args", sizes)
        split_kwargs = _split(dict(kwargs), y, "kwargs", sizes)
        if not sizes:
            raise ValueError("ReplicatedModule.forward got no tensor argument to split")
        outs = [r(*split_args[a], **split_kwargs[a]) for a, r in enumerate(self.replicas)]
        return _combine(outs, sizes)
