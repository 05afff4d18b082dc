"""Entropy-SGD: gradient descent on the local free energy (Chaudhari et al. 2017).

Reference: P. Chaudhari, A. Choromanska, S. Soatto, Y. LeCun, C. Baldassi, C. Borgs, J. Chayes,
L. Sagun, R. Zecchina, "Entropy-SGD: biasing gradient descent into wide valleys", ICLR 2017
(arXiv 1611.01838); settings and scoping as in F. Pittorino et al., "Entropic gradient descent
algorithms and wide flat minima", ICLR 2021 (arXiv 2006.07897).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatminima.optim import _amp
from flatminima.optim._common import check_nonneg, check_positive, check_sgd_args, sgd_step_

__all__ = ["EntropySGD"]

logger = logging.getLogger(__name__)

_STATE_KEYS = ("anchor", "delta", "mu_offset")


def mean_loss(losses: list[Any]) -> Tensor | None:
    """Mean of closure return values (tensors or floats) as a detached tensor, None if none."""
    vals = [loss for loss in losses if loss is not None]
    if not vals:
        return None
    ts = [v.detach() if isinstance(v, Tensor) else torch.tensor(float(v)) for v in vals]
    dtype = ts[0].dtype
    for t in ts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    device = ts[0].device
    return torch.stack([t.reshape(()).to(device=device, dtype=dtype) for t in ts]).mean()


class EntropySGD(Optimizer):
    r"""Entropy-SGD with a torch-SGD outer step.

    Per outer step, with ``gamma`` the group's current coupling :math:`\gamma_t`, ``inner_lr``
    :math:`\eta'`, ``noise`` :math:`\epsilon`, ``mu_decay`` :math:`\alpha` and ``inner_steps``
    :math:`L`::

        x <- w ; w' <- w ; mu <- w
        repeat L times (each on a fresh minibatch B):
            g' = grad E(w'; B) + gamma * (w' - x) + inner_weight_decay * w'
            w' <- w' - eta' * g' + sqrt(2 * eta') * eps * xi        xi ~ N(0, I)
            mu <- alpha * mu + (1 - alpha) * w'
        G = gamma * (x - mu)            (x - mu when scale_by_gamma=False)
        w <- x ; one torch.optim.SGD step on w with gradient G (momentum, nesterov, weight_decay)

    ``G`` is the gradient of the local free energy
    :math:`-\frac{1}{\beta}\log\int dw'\,e^{-\beta E(w') - \beta\frac{\gamma}{2}\|w'-x\|^2}`,
    estimated by the Langevin average ``mu`` of ``w'``.

    Implementation note: the code keeps the displacement ``delta = w' - x`` and the offset
    ``mu - x`` rather than ``w'`` and ``mu`` themselves, so ``x - mu`` is read off without
    catastrophic cancellation (the parameters hold ``x + delta``, where the closure evaluates the
    gradient). This is the same algorithm in exact arithmetic, and makes the exact limit
    ``inner_steps=1, noise=0, mu_decay=0, gamma=1/inner_lr`` bit-identical to ``torch.optim.SGD``
    whenever ``inner_lr`` is a power of two. The noise ``xi`` comes from the optimizer's own
    ``torch.Generator`` (one per device, seeded by ``seed``), never from the global RNG, and its
    state is part of :meth:`state_dict`.

    Cost: ``inner_steps`` gradient evaluations per outer step (:attr:`grad_evals`); memory: four
    extra copies of the parameters (anchor, displacement, mu offset, momentum).

    Per-group hyperparameters: ``lr``, ``momentum``, ``nesterov``, ``weight_decay``, ``gamma``,
    ``inner_lr``, ``noise``, ``mu_decay``, ``scale_by_gamma`` and ``inner_weight_decay`` live in
    each param group (so LR schedulers and :mod:`flatminima.optim.schedules` write them);
    ``inner_steps`` is global, because the closure is called ``inner_steps`` times per step.

    Args:
        params: parameters or param-group dicts.
        lr: outer learning rate.
        momentum: outer momentum factor (dampening is 0, as in torch's default).
        nesterov: Nesterov momentum on the outer step.
        weight_decay: L2 penalty added to ``G`` (torch SGD semantics).
        inner_steps: :math:`L >= 1`, Langevin steps (closure calls) per outer step.
        inner_lr: :math:`\eta' > 0`. Stability needs ``inner_lr * gamma`` below about 1.
        noise: :math:`\epsilon >= 0`, Langevin noise scale (thermal noise ``sqrt(2 eta') eps``).
        mu_decay: :math:`\alpha \in [0, 1)`, averaging factor of ``mu``.
        gamma: coupling :math:`\gamma >= 0` (written by coupling schedulers).
        scale_by_gamma: use ``G = gamma (x - mu)`` (True, the free-energy gradient) or
            ``G = x - mu`` (the original paper's implementation choice).
        inner_weight_decay: L2 penalty on ``w'`` inside the inner loop.
        seed: seed of the noise generators; None draws a nondeterministic seed.

    Raises:
        ValueError: on an invalid hyperparameter (the message names the value).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = EntropySGD(model.parameters(), lr=0.1, inner_steps=2, gamma=1e-3, seed=0)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = model(torch.randn(8, 3)).pow(2).mean()
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
        >>> opt.grad_evals
        2
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        inner_steps: int,
        inner_lr: float = 0.1,
        noise: float = 1e-4,
        mu_decay: float = 0.75,
        gamma: float,
        scale_by_gamma: bool = True,
        inner_weight_decay: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"Invalid inner_steps value: {inner_steps} (expected an int >= 1)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"Invalid seed value: {seed!r} (expected an int or None)")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            inner_lr=inner_lr,
            noise=noise,
            mu_decay=mu_decay,
            gamma=gamma,
            scale_by_gamma=scale_by_gamma,
            inner_weight_decay=inner_weight_decay,
        )
        self._check_group(defaults)
        self.inner_steps = inner_steps
        self.seed = seed
        self.grad_evals = 0
        self.outer_steps = 0
        self._inner_count = 0
        self._generators: dict[torch.device, torch.Generator] = {}
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        check_sgd_args(group["lr"], group["momentum"], group["weight_decay"], group["nesterov"])
        check_positive("inner_lr", group["inner_lr"])
        check_nonneg("noise", group["noise"])
        check_nonneg("gamma", group["gamma"])
        check_nonneg("inner_weight_decay", group["inner_weight_decay"])
        alpha = group["mu_decay"]
        check_nonneg("mu_decay", alpha)
        if alpha >= 1.0:
            raise ValueError(f"Invalid mu_decay value: {alpha} (expected 0 <= mu_decay < 1)")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (hyperparameters are validated like the constructor's)."""
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    # ------------------------------------------------------------------ noise generators
    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self.seed is None:
                gen.seed()
            else:
                gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    def _noise(self, params: list[Tensor]) -> list[Tensor]:
        """One flat N(0, 1) draw per (device, dtype), split into tensors shaped like ``params``."""
        keys: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            keys[(p.device, p.dtype)].append(i)
        out: list[Tensor] = [params[0]] * len(params)
        for (device, dtype), idx in keys.items():
            total = sum(params[i].numel() for i in idx)
            flat = torch.randn(total, generator=self._generator(device), device=device, dtype=dtype)
            for i, chunk in zip(idx, flat.split([params[i].numel() for i in idx])):
                out[i] = chunk.view_as(params[i])
        return out

    # ------------------------------------------------------------------ phase API
    @property
    def inner_count(self) -> int:
        """Inner steps taken in the current outer step (0 between outer steps)."""
        return self._inner_count

    @torch.no_grad()
    def inner_step(self) -> None:
        """One Langevin step on ``w'`` using the gradients already in ``.grad``.

        The first inner step of an outer step records the anchor ``x`` (the current parameters).
        Parameters without a gradient at that point stay fixed for the whole outer step; a later
        missing gradient counts as zero.
        """
        starting = self._inner_count == 0
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            for p in group["params"]:
                state = self.state[p]
                if starting:
                    if p.grad is None:
                        state["active"] = False
                        continue
                    if "anchor" not in state:
                        for key in _STATE_KEYS:
                            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["active"] = True
                elif not state.get("active", False):
                    continue
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("EntropySGD does not support sparse gradients")
                params.append(p)
                grads.append(torch.zeros_like(p) if p.grad is None else p.grad)
            if not params:
                continue
            anchors = [self.state[p]["anchor"] for p in params]
            deltas = [self.state[p]["delta"] for p in params]
            mus = [self.state[p]["mu_offset"] for p in params]
            if starting:
                torch._foreach_copy_(anchors, params)
                torch._foreach_zero_(deltas)
                torch._foreach_zero_(mus)
            eta, gamma = group["inner_lr"], group["gamma"]
            # delta <- delta - eta * (grad + gamma * delta + iwd * w') + sqrt(2 eta) eps xi
            shrink = 1.0 - eta * gamma
            if shrink != 1.0:
                torch._foreach_mul_(deltas, shrink)
            torch._foreach_add_(deltas, grads, alpha=-eta)
            if group["inner_weight_decay"] != 0.0:
                torch._foreach_add_(deltas, params, alpha=-eta * group["inner_weight_decay"])
            if group["noise"] != 0.0:
                scale = math.sqrt(2.0 * eta) * group["noise"]
                torch._foreach_add_(deltas, self._noise(params), alpha=scale)
            # w' = x + delta ; (mu - x) <- alpha (mu - x) + (1 - alpha) delta
            torch._foreach_copy_(params, anchors)
            torch._foreach_add_(params, deltas)
            torch._foreach_lerp_(mus, deltas, 1.0 - group["mu_decay"])
        self._inner_count += 1
        self.grad_evals += 1

    @torch.no_grad()
    def outer_step(self) -> None:
        """Restore ``w <- x`` and take the base SGD step with ``G = gamma (x - mu)``.

        Raises:
            RuntimeError: if no :meth:`inner_step` was taken since the last outer step.
        """
        if self._inner_count == 0:
            raise RuntimeError("outer_step() needs at least one inner_step() before it")
        for group in self.param_groups:
            params = [p for p in group["params"] if self.state[p].get("active", False)]
            if not params:
                continue
            states = [self.state[p] for p in params]
            mus = [s["mu_offset"] for s in states]
            # G = gamma * (x - mu) = -gamma * (mu - x)
            g_scale = -group["gamma"] if group["scale_by_gamma"] else -1.0
            grads = torch._foreach_mul(mus, g_scale)
            torch._foreach_copy_(params, [s["anchor"] for s in states])
            bufs = sgd_step_(
                params,
                list(grads),
                [s.get("momentum_buffer") for s in states],
                lr=group["lr"],
                momentum=group["momentum"],
                nesterov=group["nesterov"],
                weight_decay=group["weight_decay"],
            )
            if group["momentum"] != 0.0:
                for s, b in zip(states, bufs):
                    s["momentum_buffer"] = b
            for s in states:
                s["active"] = False
        self._inner_count = 0
        self.outer_steps += 1

    @torch.no_grad()
    def cancel_outer_step(self) -> None:
        """Abandon the current outer step: parameters go back to the anchor ``x``; no update."""
        if self._inner_count == 0:
            return
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if state.get("active", False):
                    p.copy_(state["anchor"])
                    state["active"] = False
        self._inner_count = 0

    # ------------------------------------------------------------------ full step
    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor | None:
        """One outer step: ``inner_steps`` closure calls, each followed by :meth:`inner_step`.

        Args:
            closure: draws a fresh minibatch, zeroes the gradients, runs forward and backward
                (``grad_scaler.scale(loss).backward()`` when a scaler is given), returns the loss.
            grad_scaler: optional ``torch.amp.GradScaler``. Gradients are unscaled after every
                pass; if any pass has an inf/nan gradient the whole step is skipped (weights
                restored to ``x``, momentum untouched) and the scale is updated once.

        Returns:
            The mean inner loss (a detached tensor), or None if the closure returns None.

        Raises:
            TypeError: if ``closure`` is None.
            RuntimeError: if called in the middle of a phase-API outer step.
        """
        if closure is None:
            raise TypeError(
                "EntropySGD.step() requires a closure (it evaluates inner_steps minibatch "
                "gradients); use inner_step()/outer_step() for a custom loop"
            )
        if self._inner_count != 0:
            raise RuntimeError("step() called in the middle of an outer step (inner_count != 0)")
        use_scaler = grad_scaler is not None and grad_scaler.is_enabled()
        found_inf: Tensor | None = None
        losses: list[Any] = []
        try:
            for _ in range(self.inner_steps):
                with torch.enable_grad():
                    losses.append(closure())
                if use_scaler:
                    assert grad_scaler is not None
                    if found_inf is None:
                        found_inf = _amp.new_found_inf(grad_scaler)
                    _amp.unscale_(grad_scaler, self._grads(), found_inf)
                self.inner_step()
        except BaseException:
            self.cancel_outer_step()  # a failing closure leaves the weights at x
            raise
        if found_inf is not None and found_inf.item() != 0.0:
            logger.debug("EntropySGD: inf/nan gradient, skipping the step")
            self.cancel_outer_step()
        else:
            self.outer_step()
        if use_scaler:
            assert grad_scaler is not None and found_inf is not None
            _amp.finish(grad_scaler, self, found_inf)
        return mean_loss(losses)

    def _grads(self) -> list[Tensor]:
        return [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Torch optimizer state plus counters and the noise generators' states."""
        sd = super().state_dict()
        sd["entropy_sgd"] = {
            "inner_steps": self.inner_steps,
            "grad_evals": self.grad_evals,
            "outer_steps": self.outer_steps,
            "inner_count": self._inner_count,
            "seed": self.seed,
            "generators": {str(d): g.get_state() for d, g in self._generators.items()},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (generators restored on their saved devices)."""
        sd = dict(state_dict)
        extra = sd.pop("entropy_sgd", None)
        super().load_state_dict(sd)
        if extra is None:
            logger.warning("EntropySGD.load_state_dict: no 'entropy_sgd' entry; counters kept")
            return
        self.inner_steps = int(extra["inner_steps"])
        self.grad_evals = int(extra["grad_evals"])
        self.outer_steps = int(extra["outer_steps"])
        self._inner_count = int(extra["inner_count"])
        self.seed = extra["seed"]
        self._generators = {}
        for dev, gstate in extra["generators"].items():
            gen = torch.Generator(device=torch.device(dev))
            gen.set_state(gstate.cpu())  # map_location may have moved the state tensor
            self._generators[torch.device(dev)] = gen
