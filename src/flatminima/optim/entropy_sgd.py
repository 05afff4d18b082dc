"""Entropy-SGD: gradient descent on the local free energy (Chaudhari et al. 2017).

Reference: P. Chaudhari, A. Choromanska, S. Soatto, Y. LeCun, C. Baldassi, C. Borgs, J. Chayes,
L. Sagun, R. Zecchina, "Entropy-SGD: biasing gradient descent into wide valleys", ICLR 2017
(arXiv 1611.01838); settings and scoping as in F. Pittorino et al., "Entropic gradient descent
algorithms and wide flat minima", ICLR 2021 (arXiv 2006.07897).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatminima.optim import _amp
from flatminima.optim._common import (
    PassCounter,
    check_base_group,
    check_nonneg,
    check_optimizer_class,
    check_positive,
    check_sgd_args,
    group_with_defaults,
    sgd_step_,
)

__all__ = ["EntropySGD"]

logger = logging.getLogger(__name__)

_STATE_KEYS = ("anchor", "delta", "mu_offset")
_KNOWN_STATE = frozenset((*_STATE_KEYS, "active", "momentum_buffer"))
_INNER_KEYS = ("gamma", "inner_lr", "noise", "mu_decay", "scale_by_gamma", "inner_weight_decay")
_SGD_KEYS = ("lr", "momentum", "nesterov", "weight_decay")
_EXTRA_KEYS = ("inner_steps", "grad_evals", "outer_steps", "inner_count", "seed", "generators")

_NO_CLOSURE = (
    "EntropySGD.step() needs a closure: it evaluates inner_steps minibatch gradients per call. "
    "Pass a closure that draws a fresh minibatch and runs forward/backward, or construct "
    "EntropySGD(..., one_batch_per_step=True) so that each step() (after loss.backward()) is one "
    "Langevin step on the current minibatch, as in a plain loop, Lightning or the HF Trainer"
)


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


class EntropySGD(Optimizer, PassCounter):
    r"""Entropy-SGD with a torch-SGD (or any base optimizer's) outer step.

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
                 (or, with base_optimizer: .grad <- G ; base_optimizer.step())

    ``G`` is the gradient of the local free energy
    :math:`-\frac{1}{\beta}\log\int dw'\,e^{-\beta E(w') - \beta\frac{\gamma}{2}\|w'-x\|^2}`,
    estimated by the Langevin average ``mu`` of ``w'``.

    Three ways to drive it (all the same algorithm, bit for bit, on the same minibatches):

    * ``step(closure)``: one outer step; the closure (fresh minibatch, zero grads, forward,
      backward, return loss) is called ``inner_steps`` times.
    * ``one_batch_per_step=True``: every ``step()`` is ONE Langevin step on the gradient of the
      current minibatch (from the closure, called once, or, without a closure, the gradients
      already in ``.grad``: ``loss.backward(); opt.step()``); every ``inner_steps``-th call also
      makes the outer update. This is how plain loops, Lightning's automatic optimization and the
      Hugging Face Trainer use it. Between calls the parameters hold the walker ``w' = x + delta``;
      after the ``L``-th call they hold the new ``x``. :meth:`anchor_weights` puts ``x`` in the
      parameters for evaluation or checkpoints mid-cycle; :attr:`inner_count` says where in the
      cycle it is.
    * the phase API: :meth:`inner_step` after each backward, :meth:`outer_step` after ``L``.

    Implementation note: the code keeps the displacement ``delta = w' - x`` and the offset
    ``mu - x`` rather than ``w'`` and ``mu`` themselves, so ``x - mu`` is read off without
    catastrophic cancellation (the parameters hold ``x + delta``, where the gradient is
    evaluated). This is the same algorithm in exact arithmetic, and makes the exact limit
    ``inner_steps=1, noise=0, mu_decay=0, gamma=1/inner_lr`` bit-identical to ``torch.optim.SGD``
    whenever ``inner_lr`` is a power of two. The noise ``xi`` is one standard-normal draw per
    inner step and (device, dtype), from the optimizer's own ``torch.Generator`` (one per device,
    seeded by ``seed``) into a preallocated flat buffer, split in parameter order over the groups
    with ``noise != 0``; never from the global RNG. The generators' states are part of
    :meth:`state_dict`.

    Cost: ``inner_steps`` backward passes per outer step (:attr:`grad_evals`); memory: four
    extra copies of the parameters (anchor, displacement, mu offset, momentum or the base
    optimizer's state) and the noise buffer.

    Per-group hyperparameters: ``lr``, ``gamma``, ``inner_lr``, ``noise``, ``mu_decay``,
    ``scale_by_gamma``, ``inner_weight_decay`` and the outer step's ``momentum``, ``nesterov``,
    ``weight_decay`` (or the base optimizer's hyperparameters) live in each param group, so LR
    schedulers and :mod:`flatminima.optim.schedules` write them; ``inner_steps`` is global.

    Args:
        params: parameters or param-group dicts.
        lr: outer learning rate (the base optimizer's ``lr`` when one is given).
        momentum: outer momentum factor (dampening is 0, as in torch's default).
        nesterov: Nesterov momentum on the outer step.
        weight_decay: L2 penalty added to ``G`` (torch SGD semantics).
        inner_steps: :math:`L >= 1`, Langevin steps per outer step.
        inner_lr: :math:`\eta' > 0`. Stability needs ``inner_lr * gamma`` below about 1.
        noise: :math:`\epsilon >= 0`, Langevin noise scale (thermal noise ``sqrt(2 eta') eps``).
        mu_decay: :math:`\alpha \in [0, 1)`, averaging factor of ``mu``.
        gamma: coupling :math:`\gamma >= 0` (written by coupling schedulers).
        scale_by_gamma: use ``G = gamma (x - mu)`` (True, the free-energy gradient) or
            ``G = x - mu`` (the original paper's implementation choice).
        inner_weight_decay: L2 penalty on ``w'`` inside the inner loop.
        seed: seed of the noise generators; None draws a nondeterministic seed.
        one_batch_per_step: each :meth:`step` is one Langevin step (see above).
        base_optimizer: an optimizer class (e.g. ``torch.optim.AdamW``) for the outer step, built
            over the same param groups (per-group settings such as ``weight_decay=0`` for norms
            and biases apply); None (default) is the built-in torch-SGD step. With a base
            optimizer, ``momentum``/``nesterov``/``weight_decay`` go into ``base_kwargs``.
        base_kwargs: the base optimizer's hyperparameters other than ``lr``.

    Raises:
        ValueError: on an invalid hyperparameter (the message names the value).
        TypeError: if ``base_optimizer`` is not an optimizer class.

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

        One minibatch per ``step()`` with an AdamW outer step (a plain training loop):

        >>> opt = EntropySGD(model.parameters(), lr=1e-3, inner_steps=3, gamma=1e-3, seed=0,
        ...                  one_batch_per_step=True, base_optimizer=torch.optim.AdamW,
        ...                  base_kwargs={"weight_decay": 0.01})
        >>> for _ in range(4):
        ...     opt.zero_grad()
        ...     model(torch.randn(8, 3)).pow(2).mean().backward()
        ...     opt.step()
        >>> opt.inner_count, opt.outer_steps, opt.grad_evals
        (1, 1, 4)
        >>> with opt.anchor_weights():      # x in the parameters, e.g. to evaluate or save
        ...     opt.holds_anchor
        True
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
        one_batch_per_step: bool = False,
        base_optimizer: type[Optimizer] | None = None,
        base_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"Invalid inner_steps value: {inner_steps} (expected an int >= 1)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"Invalid seed value: {seed!r} (expected an int or None)")
        if not isinstance(one_batch_per_step, bool):
            raise ValueError(
                f"Invalid one_batch_per_step value: {one_batch_per_step!r} (expected True or False)"
            )
        inner = dict(
            inner_lr=inner_lr,
            noise=noise,
            mu_decay=mu_decay,
            gamma=gamma,
            scale_by_gamma=scale_by_gamma,
            inner_weight_decay=inner_weight_decay,
        )
        outer = self._outer_defaults(
            lr, momentum, nesterov, weight_decay, base_optimizer, base_kwargs
        )
        self._base_cls = base_optimizer
        defaults = dict(outer, **inner)
        self._check_group(defaults)
        self.inner_steps = inner_steps
        self.seed = seed
        self.one_batch_per_step = one_batch_per_step
        self.grad_evals = 0  # backward passes of one minibatch (alias: passes)
        self.outer_steps = 0
        self._inner_count = 0
        self._anchored = False
        self._generators: dict[torch.device, torch.Generator] = {}
        self._noise_bufs: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self.base_optimizer: Optimizer | None = None
        super().__init__(params, defaults)
        if base_optimizer is not None:
            self.base_optimizer = base_optimizer(self.param_groups, **outer)
            self.param_groups = self.base_optimizer.param_groups  # shared group dicts
            self.defaults.update(self.base_optimizer.defaults)

    @staticmethod
    def _outer_defaults(
        lr: float,
        momentum: float,
        nesterov: bool,
        weight_decay: float,
        base_optimizer: type[Optimizer] | None,
        base_kwargs: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """The outer step's group defaults: built-in SGD's, or ``lr`` plus ``base_kwargs``."""
        if base_optimizer is None:
            if base_kwargs:
                raise ValueError(f"base_kwargs={base_kwargs!r} given without a base_optimizer")
            return dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        check_optimizer_class("base_optimizer", base_optimizer)
        if momentum != 0.0 or nesterov or weight_decay != 0.0:
            raise ValueError(
                f"momentum={momentum}, nesterov={nesterov}, weight_decay={weight_decay} configure "
                f"the built-in SGD outer step; with base_optimizer={base_optimizer.__name__} pass "
                "them in base_kwargs"
            )
        if base_kwargs is not None and not isinstance(base_kwargs, dict):
            raise ValueError(f"Invalid base_kwargs value: {base_kwargs!r} (expected a dict)")
        kwargs = dict(base_kwargs or {})
        clash = sorted(set(kwargs) & set(_INNER_KEYS))
        if clash:
            raise ValueError(
                f"base_kwargs has {clash}: these are EntropySGD's own arguments, pass them directly"
            )
        if "lr" in kwargs:
            raise ValueError(
                f"base_kwargs has lr={kwargs['lr']!r}: pass the base optimizer's lr as lr={lr!r}"
            )
        return dict(lr=lr, **kwargs)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate one group's hyperparameters (no side effects)."""
        check_positive("inner_lr", group["inner_lr"])
        check_nonneg("noise", group["noise"])
        check_nonneg("gamma", group["gamma"])
        check_nonneg("inner_weight_decay", group["inner_weight_decay"])
        alpha = group["mu_decay"]
        check_nonneg("mu_decay", alpha)
        if alpha >= 1.0:
            raise ValueError(f"Invalid mu_decay value: {alpha} (expected 0 <= mu_decay < 1)")
        if self._base_cls is None:
            check_sgd_args(group["lr"], group["momentum"], group["weight_decay"], group["nesterov"])
        else:
            check_base_group(self._base_cls, group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its hyperparameters are validated BEFORE it is appended.

        Raises:
            ValueError: on an invalid hyperparameter; ``param_groups`` is then unchanged.
        """
        merged = group_with_defaults(param_group, self.defaults)
        self._check_group(merged)
        if self.base_optimizer is None:
            super().add_param_group(param_group)
        else:
            for key, value in self.defaults.items():
                param_group.setdefault(key, value)
            self.base_optimizer.add_param_group(param_group)  # appends to the shared list

    # ------------------------------------------------------------------ noise
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

    def _noise(self, work: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]) -> list[Any]:
        """Standard-normal noise shaped like each group's params (None where ``noise == 0``).

        One draw per (device, dtype) per inner step, into a flat buffer kept between steps, split
        in parameter order over the groups that need noise.
        """
        out: list[Any] = [None] * len(work)
        keys: dict[tuple[torch.device, torch.dtype], list[tuple[int, int]]] = defaultdict(list)
        for gi, (group, params, _) in enumerate(work):
            if group["noise"] != 0.0:
                out[gi] = [params[0]] * len(params)
                for pi, p in enumerate(params):
                    keys[(p.device, p.dtype)].append((gi, pi))
        for (device, dtype), idx in keys.items():
            sizes = [work[gi][1][pi].numel() for gi, pi in idx]
            total = sum(sizes)
            buf = self._noise_bufs.get((device, dtype))
            if buf is None or buf.numel() != total:
                buf = torch.empty(total, device=device, dtype=dtype)
                self._noise_bufs[(device, dtype)] = buf
            buf.normal_(generator=self._generator(device))
            for (gi, pi), chunk in zip(idx, buf.split(sizes)):
                out[gi][pi] = chunk.view_as(work[gi][1][pi])
        return out

    # ------------------------------------------------------------------ phase API
    @property
    def inner_count(self) -> int:
        """Where in the cycle it is: Langevin steps taken since the last outer step.

        0 when the parameters hold the outer weights ``x``; ``k`` in ``1 .. inner_steps - 1``
        when they hold the walker ``w'`` after ``k`` Langevin steps (one-batch-per-step mode or
        the phase API, between calls).
        """
        return self._inner_count

    @property
    def holds_anchor(self) -> bool:
        """True when the parameters hold the outer weights ``x`` (no open cycle, or inside
        :meth:`anchor_weights`); False while they hold the Langevin walker ``w'``."""
        return self._inner_count == 0 or self._anchored

    def _active(self) -> Iterator[tuple[Tensor, dict[str, Any]]]:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if state.get("active", False):
                    yield p, state

    @contextlib.contextmanager
    def anchor_weights(self) -> Iterator[EntropySGD]:
        """Context manager: the parameters hold the outer weights ``x`` inside the block.

        On exit they hold the walker ``w' = x + delta`` again, exactly as before (the optimizer
        recomputes it from its state with the same single rounding). A no-op when no cycle is
        open. Use it to evaluate or checkpoint the outer weights mid-cycle; ``step()`` inside the
        block raises RuntimeError.

        Example:
            >>> m = torch.nn.Linear(2, 1)
            >>> opt = EntropySGD(m.parameters(), lr=0.1, inner_steps=2, gamma=0.1,
            ...                  one_batch_per_step=True, seed=0)
            >>> m(torch.ones(1, 2)).sum().backward()
            >>> opt.step()
            >>> w_walker = m.weight.detach().clone()
            >>> with opt.anchor_weights():
            ...     torch.equal(m.weight, opt.state[m.weight]["anchor"])
            True
            >>> torch.equal(m.weight, w_walker)
            True
        """
        if self.holds_anchor:
            yield self
            return
        with torch.no_grad():
            for p, state in self._active():
                p.copy_(state["anchor"])
        self._anchored = True
        try:
            yield self
        finally:
            self._put_walker()
            self._anchored = False

    @torch.no_grad()
    def _put_walker(self) -> None:
        """Parameters <- x + delta (the walker) for every active parameter."""
        for p, state in self._active():
            torch.add(state["anchor"], state["delta"], out=p)

    def _check_not_anchored(self, what: str) -> None:
        if self._anchored:
            raise RuntimeError(f"{what} called inside anchor_weights(); leave the block first")

    def _collect(self, starting: bool) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]:
        """Per group: the active params and their gradients (validated before any change)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("EntropySGD does not support sparse gradients")
        work = []
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            for p in group["params"]:
                state = self.state[p]
                if starting:
                    state["active"] = p.grad is not None
                if not state.get("active", False):
                    continue
                params.append(p)
                grads.append(torch.zeros_like(p) if p.grad is None else p.grad)
            if params:
                work.append((group, params, grads))
        return work

    def _open_cycle(self, work: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]) -> None:
        """First inner step: x <- current params, delta <- 0, mu - x <- 0."""
        for _, params, _ in work:
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if "anchor" not in state:
                    for key in _STATE_KEYS:
                        state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            torch._foreach_copy_([s["anchor"] for s in states], params)
            torch._foreach_zero_([s["delta"] for s in states])
            torch._foreach_zero_([s["mu_offset"] for s in states])

    @torch.no_grad()
    def inner_step(self) -> None:
        """One Langevin step on ``w'`` using the gradients already in ``.grad``.

        The first inner step of an outer step records the anchor ``x`` (the current parameters).
        Parameters without a gradient at that point stay fixed for the whole outer step; a later
        missing gradient counts as zero.

        Raises:
            RuntimeError: on a sparse gradient (nothing is changed) or inside
                :meth:`anchor_weights`.
        """
        self._check_not_anchored("inner_step()")
        starting = self._inner_count == 0
        work = self._collect(starting)
        if starting:
            self._open_cycle(work)
        for (group, params, grads), xi in zip(work, self._noise(work)):
            self._langevin_(group, params, grads, xi)
        self._inner_count += 1
        self.grad_evals += 1

    def _langevin_(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], xi: Any
    ) -> None:
        """delta <- delta - eta (grad + gamma delta + iwd w') + sqrt(2 eta) eps xi ;
        w' <- x + delta ; (mu - x) <- alpha (mu - x) + (1 - alpha) delta."""
        states = [self.state[p] for p in params]
        deltas = [s["delta"] for s in states]
        eta = group["inner_lr"]
        shrink = 1.0 - eta * group["gamma"]
        if shrink != 1.0:
            torch._foreach_mul_(deltas, shrink)
        torch._foreach_add_(deltas, grads, alpha=-eta)
        if group["inner_weight_decay"] != 0.0:
            torch._foreach_add_(deltas, params, alpha=-eta * group["inner_weight_decay"])
        if xi is not None:
            torch._foreach_add_(deltas, xi, alpha=math.sqrt(2.0 * eta) * group["noise"])
        for p, s in zip(params, states):
            torch.add(s["anchor"], s["delta"], out=p)  # one pass: w' = x + delta
        torch._foreach_lerp_([s["mu_offset"] for s in states], deltas, 1.0 - group["mu_decay"])

    @torch.no_grad()
    def outer_step(self) -> None:
        """Restore ``w <- x`` and take the outer step with ``G = gamma (x - mu)``.

        Built-in: one torch-SGD step with ``G``. With a base optimizer: each active parameter's
        ``.grad`` is set to ``G``, ``base_optimizer.step()`` runs, and the previous ``.grad``
        tensors are put back.

        Raises:
            RuntimeError: if no :meth:`inner_step` was taken since the last outer step, or inside
                :meth:`anchor_weights`.
        """
        self._check_not_anchored("outer_step()")
        if self._inner_count == 0:
            raise RuntimeError("outer_step() needs at least one inner_step() before it")
        base_params: list[Tensor] = []
        base_grads: list[Tensor] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if self.state[p].get("active", False)]
            if not params:
                continue
            states = [self.state[p] for p in params]
            # G = gamma * (x - mu) = -gamma * (mu - x), computed in place: the mu offsets are
            # scratch from here on (zeroed when the next cycle opens)
            g_scale = -group["gamma"] if group["scale_by_gamma"] else -1.0
            grads = [s["mu_offset"] for s in states]
            torch._foreach_mul_(grads, g_scale)
            torch._foreach_copy_(params, [s["anchor"] for s in states])
            if self.base_optimizer is None:
                self._sgd_outer_(group, params, list(grads), states)
            else:
                base_params += params
                base_grads += grads
        if self.base_optimizer is not None:
            self._base_outer_(base_params, base_grads)
        for _, state in list(self._active()):
            state["active"] = False
        self._inner_count = 0
        self.outer_steps += 1

    def _sgd_outer_(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
    ) -> None:
        bufs = sgd_step_(
            params,
            grads,
            [s.get("momentum_buffer") for s in states],
            lr=group["lr"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
        )
        if group["momentum"] != 0.0:
            for s, b in zip(states, bufs):
                s["momentum_buffer"] = b

    def _base_outer_(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """``.grad <- G`` on the active params (None elsewhere), base step, old grads back."""
        assert self.base_optimizer is not None
        saved = [(p, p.grad) for g in self.param_groups for p in g["params"]]
        try:
            for p, _ in saved:
                p.grad = None
            for p, g in zip(params, grads):
                p.grad = g
            self.base_optimizer.step()
        except BaseException:
            self.cancel_outer_step()  # a failing base step leaves the weights at x
            raise
        finally:
            for p, g in saved:
                p.grad = g

    @torch.no_grad()
    def cancel_outer_step(self) -> None:
        """Abandon the current outer step: parameters go back to the anchor ``x``; no update."""
        if self._inner_count == 0:
            return
        self._anchored = False
        for p, state in list(self._active()):
            p.copy_(state["anchor"])
            state["active"] = False
        self._inner_count = 0

    # ------------------------------------------------------------------ full step
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> Any:
        """One outer step (``inner_steps`` closure calls), or one Langevin step per call.

        Args:
            closure: draws a fresh minibatch, zeroes the gradients, runs forward and backward
                (``grad_scaler.scale(loss).backward()`` when a scaler is given), returns the loss.
                Required unless ``one_batch_per_step=True``; in that mode it is called once, and
                without it the gradients already in ``.grad`` are used.
            grad_scaler: optional ``torch.amp.GradScaler``. Gradients are unscaled after every
                pass. Full step: if any pass has an inf/nan gradient the whole step is skipped
                (weights restored to ``x``, momentum untouched) and the scale is updated once.
                One batch per step: a pass with inf/nan is skipped (no Langevin step; it still
                counts in :attr:`grad_evals`) and the scale is updated once per call.

        A closure that raises leaves the parameters as they were before the call (full step:
        back to ``x``, the outer step abandoned; one batch per step: nothing was changed yet).

        Returns:
            Full step: the mean inner loss (a detached tensor), or None if the closure returns
            None. One batch per step: the closure's return value (None without a closure).

        Raises:
            TypeError: if ``closure`` is None and ``one_batch_per_step`` is False.
            RuntimeError: if a full step is called in the middle of a phase-API outer step, or
                inside :meth:`anchor_weights`.
        """
        self._check_not_anchored("step()")
        if self.one_batch_per_step:
            return self._step_one_batch(closure, grad_scaler)
        if closure is None:
            raise TypeError(_NO_CLOSURE)
        if self._inner_count != 0:
            raise RuntimeError("step() called in the middle of an outer step (inner_count != 0)")
        found_inf: Tensor | None = None
        losses: list[Any] = []
        try:
            for _ in range(self.inner_steps):
                with torch.enable_grad():
                    losses.append(closure())
                found_inf = _amp.unscale_pass(grad_scaler, self._grads, found_inf)
                self.inner_step()
        except BaseException:
            self.cancel_outer_step()  # a failing closure leaves the weights at x
            raise
        if found_inf is not None and found_inf.item() != 0.0:
            logger.debug("EntropySGD: inf/nan gradient, skipping the step")
            self.cancel_outer_step()
        else:
            self.outer_step()
        _amp.finish(grad_scaler, self, found_inf)
        return mean_loss(losses)

    def _step_one_batch(
        self, closure: Callable[[], Any] | None, grad_scaler: torch.amp.GradScaler | None
    ) -> Any:
        """One Langevin step on this minibatch's gradient; the outer update every L-th call.

        A raising closure changes nothing (it runs before any update)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = _amp.unscale_pass(grad_scaler, self._grads)
        if found_inf is not None and found_inf.item() != 0.0:
            logger.debug("EntropySGD: inf/nan gradient, skipping this Langevin step")
            self.grad_evals += 1
        else:
            self.inner_step()
            if self._inner_count >= self.inner_steps:
                self.outer_step()
        _amp.finish(grad_scaler, self, found_inf)
        return loss

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Torch optimizer state plus counters, the noise generators' and the base's state.

        Valid at any point of a cycle: loading it (after the model's weights) and continuing
        equals the uninterrupted run bit for bit.
        """
        sd = super().state_dict()
        sd["entropy_sgd"] = {
            "inner_steps": self.inner_steps,
            "grad_evals": self.grad_evals,
            "outer_steps": self.outer_steps,
            "inner_count": self._inner_count,
            "seed": self.seed,
            "generators": {str(d): g.get_state() for d, g in self._generators.items()},
            "base_optimizer": None if self._base_cls is None else self._base_cls.__name__,
            "base": None if self.base_optimizer is None else self.base_optimizer.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (generators restored on their saved devices).

        Mid-cycle, the parameters are then set to the saved walker ``w' = x + delta``, so load
        the model's weights first (whether they were saved as ``w'`` or, inside
        :meth:`anchor_weights`, as ``x``) and the optimizer's state after them.

        Raises:
            ValueError: if ``state_dict`` is not an EntropySGD state (e.g. torch SGD's, SAM's)
                or was saved with a different base optimizer; nothing is changed then.
        """
        sd = dict(state_dict)
        extra = sd.pop("entropy_sgd", None)
        self._validate_state_dict(sd, extra)
        super().load_state_dict(sd)
        if self.base_optimizer is not None:
            self.base_optimizer.load_state_dict(extra["base"])
            self.base_optimizer.param_groups = self.param_groups  # share the group dicts again
        self.inner_steps = int(extra["inner_steps"])
        self.grad_evals = int(extra["grad_evals"])
        self.outer_steps = int(extra["outer_steps"])
        self._inner_count = int(extra["inner_count"])
        self._anchored = False
        self.seed = extra["seed"]
        self._generators = {}
        for dev, gstate in extra["generators"].items():
            gen = torch.Generator(device=torch.device(dev))
            gen.set_state(gstate.cpu())  # map_location may have moved the state tensor
            self._generators[torch.device(dev)] = gen
        if self._inner_count:
            self._put_walker()

    def _validate_state_dict(self, sd: dict[str, Any], extra: Any) -> None:
        """Refuse another optimizer's state dict with a ValueError naming what is wrong."""
        if not isinstance(extra, dict) or any(k not in extra for k in _EXTRA_KEYS):
            raise ValueError(
                "EntropySGD.load_state_dict: not an EntropySGD state dict (no complete "
                f"'entropy_sgd' entry; top-level keys {sorted(state_dict_keys(sd, extra))}); "
                "was it saved by another optimizer?"
            )
        ours = None if self._base_cls is None else self._base_cls.__name__
        theirs = extra.get("base_optimizer")
        if theirs != ours or (ours is not None and not isinstance(extra.get("base"), dict)):
            raise ValueError(
                f"EntropySGD.load_state_dict: the state was saved with base_optimizer={theirs}, "
                f"this optimizer has base_optimizer={ours}"
            )
        need = _INNER_KEYS + (_SGD_KEYS if ours is None else ("lr",))
        for i, group in enumerate(sd.get("param_groups", [])):
            missing = [k for k in need if k not in group]
            if missing:
                raise ValueError(
                    f"EntropySGD.load_state_dict: param group {i} lacks {missing}: the state "
                    "was saved by another optimizer"
                )
        for key, pstate in sd.get("state", {}).items():
            unknown = sorted(set(pstate) - _KNOWN_STATE)
            if unknown:
                raise ValueError(
                    f"EntropySGD.load_state_dict: parameter {key} has state {unknown} that "
                    "EntropySGD does not keep: the state was saved by another optimizer"
                )


def state_dict_keys(sd: dict[str, Any], extra: Any) -> list[str]:
    """Top-level keys of a state dict whose ``entropy_sgd`` entry was popped (for messages)."""
    return [*sd.keys(), *(["entropy_sgd"] if extra is not None else [])]
