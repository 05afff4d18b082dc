"""Replicated-SGD with one replica per process (or per data-parallel group of processes)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from flatminima.optim._common import (
    PassCounter,
    add_coupling_,
    check_nonneg,
    check_sgd_args,
    sgd_step_,
)

__all__ = ["DistributedReplicatedSGD"]

log = logging.getLogger(__name__)


class DistributedReplicatedSGD(Optimizer, PassCounter):
    r"""Replicated-SGD where each process holds one replica ``w_a`` and the centre is an all-reduce.

    The same algorithm as :class:`flatminima.optim.ReplicatedSGD` (Pittorino et al., ICLR 2021,
    arXiv 2006.07897; Baldassi et al., PNAS 2016): objective
    :math:`\sum_a E(w_a) + \frac{\gamma}{2}\sum_a \|w_a - c\|^2`, :math:`c = \frac1y \sum_a w_a`.
    At step ``t`` (0-based) with ``t % K == 0`` (``K = coupling_every``) and ``gamma_t > 0``::

        c   = all_reduce_sum(w, group) / W             # W = y * G ranks; each replica counted G
                                                       # times, so c is the replica mean
        G_a = grad E(w_a; B_a) + K * gamma_t * (w_a - c)

    otherwise ``G_a = grad E(w_a; B_a)``; then the ``torch.optim.SGD`` step (momentum, Nesterov,
    weight decay; dampening 0) on the local replica. Replica gradients are never averaged across
    replicas. With ``G > 1`` processes per replica, each computes the gradient of its slice of
    the replica's minibatch and :meth:`average_gradients` all-reduces it over ``replica_group``
    (divided by ``G``) first, so the ``G`` copies of ``w_a`` stay identical.

    The parameters are re-stored as views of one contiguous buffer (and their gradients as views
    of another), so the centre costs one all-reduce of ``4 N`` bytes (float32) and the update a few
    whole-buffer kernels. Keep the gradients in place: :meth:`zero_grad` zeroes the buffer
    (``set_to_none`` is ignored); a gradient replaced by other code is copied back before the
    step.

    Collectives: :meth:`average_gradients` (replica group, every step when ``G > 1``) and
    :meth:`couple` (default group, every ``K`` steps when ``gamma > 0``). :meth:`step` calls the
    ones not yet called this step; every rank must call :meth:`couple` on every step (even one
    a GradScaler skips), so that the collectives line up.

    Args:
        params: the local replica's parameters (one dtype and device; all ``requires_grad``).
        lr, momentum, nesterov, weight_decay: as in ``torch.optim.SGD``.
        gamma: coupling :math:`\gamma_t >= 0` (in the param group; schedulers write it).
        coupling_every: ``K >= 1``.
        group: the process group over which the centre is averaged (default: the world).
        replica_group: the ``G`` ranks sharing this replica (``None``: ``G = 1``).

    Raises:
        ValueError: an invalid hyperparameter, no parameters, or mixed dtypes/devices.
        RuntimeError: if ``torch.distributed`` is not initialised.

    Example (in each of ``y`` processes, after ``init_process_group``)::

        model = build_replica(rank)                         # replica ``rank``
        opt = DistributedReplicatedSGD(model.parameters(), lr=0.05, momentum=0.9, gamma=1e-3)
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        gamma: float,
        coupling_every: int = 1,
        group: Any = None,
        replica_group: Any = None,
    ) -> None:
        check_sgd_args(lr, momentum, weight_decay, nesterov)
        check_nonneg("gamma", gamma)
        if (
            isinstance(coupling_every, bool)
            or not isinstance(coupling_every, int)
            or coupling_every < 1
        ):
            raise ValueError(
                f"Invalid coupling_every value: {coupling_every!r} (expected an int >= 1)"
            )
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "DistributedReplicatedSGD needs an initialised torch.distributed "
                "process group (see flatminima.distributed.init_distributed)"
            )
        plist = list(params)
        if not plist:
            raise ValueError("DistributedReplicatedSGD got an empty parameter list")
        if any(not isinstance(p, Tensor) for p in plist):
            raise ValueError(
                "DistributedReplicatedSGD takes tensors (one parameter group), "
                "not param-group dicts"
            )
        kinds = {(p.dtype, p.device) for p in plist}
        if len(kinds) != 1:
            raise ValueError(f"DistributedReplicatedSGD needs one dtype and device, got {kinds}")
        self.group = group
        self.replica_group = replica_group
        self.world = dist.get_world_size(group)
        self.group_size = 1 if replica_group is None else dist.get_world_size(replica_group)
        self._params = plist
        self._flatten()
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            gamma=gamma,
            coupling_every=coupling_every,
        )
        super().__init__([self.flat], defaults)
        self.steps = 0
        self.grad_evals = 0  # backward passes of one minibatch (alias: passes)
        self._averaged = False  # average_gradients() called this step
        self._coupled_done = False  # couple() called this step
        self._coupled = False  # ... and it added the coupling (and the weight decay)

    # ------------------------------------------------------------------ flat buffers
    @torch.no_grad()
    def _flatten(self) -> None:
        p0 = self._params[0]
        n = sum(p.numel() for p in self._params)
        flat = torch.empty(n, dtype=p0.dtype, device=p0.device)
        grad = torch.zeros_like(flat)
        self._views: list[tuple[Tensor, Tensor]] = []
        off = 0
        for p in self._params:
            k = p.numel()
            flat[off : off + k].copy_(p.reshape(-1))
            if p.grad is not None:
                grad[off : off + k].copy_(p.grad.reshape(-1))
            p.data = flat[off : off + k].view_as(p)
            gview = grad[off : off + k].view_as(p)
            p.grad = gview
            self._views.append((p, gview))
            off += k
        flat.requires_grad_(True)
        flat.grad = grad
        self.flat = flat
        self.flat_grad = grad

    @torch.no_grad()
    def _sync_grads(self) -> None:
        for p, view in self._views:
            if p.grad is None:
                view.zero_()
                p.grad = view
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
                p.grad = view

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient in place (``set_to_none`` is ignored: the views must stay)."""
        del set_to_none
        self._sync_grads()
        self.flat_grad.zero_()

    # ------------------------------------------------------------------ collectives
    def coupling_active(self, step: int | None = None) -> bool:
        """Whether the coupling (and its all-reduce) happens at 0-based ``step`` (default: next)."""
        t = self.steps if step is None else step
        g = self.param_groups[0]
        # with one replica (y = W / G = 1) the coupling is exactly zero: skipped, as in
        # ReplicatedSGD, so that y = 1 is plain SGD bit for bit
        return g["gamma"] != 0.0 and t % g["coupling_every"] == 0 and self.world > self.group_size

    @torch.no_grad()
    def average_gradients(self) -> None:
        """All-reduce the gradient over the replica's ``G`` ranks and divide by ``G``."""
        self._sync_grads()
        if self.replica_group is not None and self.group_size > 1:
            dist.all_reduce(self.flat_grad, group=self.replica_group)
            self.flat_grad.div_(self.group_size)
        self._averaged = True

    @torch.no_grad()
    def couple(self) -> None:
        """On coupling steps, add ``K gamma (w - c) + weight_decay * w`` to the gradient.

        The centre ``c`` is one all-reduce of the flat parameters over ``group``. Weight decay is
        folded in here (and skipped in the SGD step), with the same operations as
        :class:`~flatminima.optim.ReplicatedSGD`, so the numbers match it to rounding.
        """
        self._sync_grads()
        self._coupled = self.coupling_active()
        if self._coupled:
            g = self.param_groups[0]
            kg = g["coupling_every"] * g["gamma"]
            total = self.flat.detach().clone()
            dist.all_reduce(total, group=self.group)  # sum over W ranks = G * sum_a w_a
            # c = total / W (the sum over W ranks is G times the sum over replicas)
            add_coupling_(self.flat_grad, self.flat, total, kg, g["weight_decay"], self.world)
        self._coupled_done = True

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Gradient averaging and coupling (if not called yet this step), then the SGD step.

        Args:
            closure: optional; zeroes the gradient, runs the replica on its minibatch,
                backpropagates and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._averaged:
            self.average_gradients()
        if not self._coupled_done:
            self.couple()
        self._finish_step(update=True)
        return loss

    def skip_step(self) -> None:
        """Count a step whose update was skipped (a GradScaler found inf/NaN gradients).

        Call it after :meth:`couple` so the step counter, and with it the coupling schedule,
        stays the same on every rank.
        """
        self._finish_step(update=False)

    def _finish_step(self, update: bool) -> None:
        if update:
            g = self.param_groups[0]
            wd = 0.0 if self._coupled else g["weight_decay"]
            state = self.state[self.flat]
            bufs = sgd_step_(
                [self.flat.detach()],
                [self.flat_grad],
                [state.get("momentum_buffer")],
                lr=g["lr"],
                momentum=g["momentum"],
                nesterov=g["nesterov"],
                weight_decay=wd,
            )
            if g["momentum"] != 0.0:
                state["momentum_buffer"] = bufs[0]
        self.steps += 1
        self.grad_evals += 1
        self._averaged = False
        self._coupled = False
        self._coupled_done = False

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Torch optimizer state (the flat momentum buffer) plus the step counters."""
        sd = super().state_dict()
        sd["distributed_replicated_sgd"] = {"steps": self.steps, "grad_evals": self.grad_evals}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`."""
        sd = dict(state_dict)
        extra = sd.pop("distributed_replicated_sgd", None)
        super().load_state_dict(sd)
        if extra is not None:
            self.steps = int(extra["steps"])
            self.grad_evals = int(extra["grad_evals"])
