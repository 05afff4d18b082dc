"""Replicated-SGD: y coupled replicas of a network (Baldassi et al. 2016, Pittorino et al. 2021).

References: C. Baldassi, C. Borgs, J. Chayes, A. Ingrosso, C. Lucibello, L. Saglietti,
R. Zecchina, "Unreasonable effectiveness of learning neural networks: from accessible states and
robust ensembles to basic algorithmic schemes", PNAS 2016 (arXiv 1605.06444); F. Pittorino et al.,
"Entropic gradient descent algorithms and wide flat minima", ICLR 2021 (arXiv 2006.07897).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from flatminima.optim._common import add_coupling_, check_nonneg, check_sgd_args, sgd_step_

__all__ = ["Replicas", "ReplicatedSGD", "update_bn"]

logger = logging.getLogger(__name__)

_INITS = ("independent", "same")
_BACKENDS = ("loop", "vmap")


def _reset_all(module: nn.Module) -> int:
    """Call ``reset_parameters`` on every submodule that has one; return how many did."""
    n = 0
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
            n += 1
    return n


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed the global RNG inside the block and restore its state afterwards (None: no-op)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class Replicas(nn.Module):
    r"""``y`` replicas of one architecture, with their parameters in flat ``[y, N]`` buffers.

    The trainable parameters of all replicas live in one flat tensor of shape ``[y, N]`` per
    (dtype, device), and so do their gradients; each replica's ``nn.Parameter`` is a view into
    its row. The coupling and the optimizer step then cost a few whole-buffer kernels instead of
    a Python loop over tensors and replicas (see docs/design.md, "Performance notes"). Moving the module
    (``.to()``, ``.double()``) re-flattens the buffers: create the optimizer afterwards.

    Iterating or indexing yields the replica modules; ``len()`` is ``y``.

    Args:
        model_or_factory: an ``nn.Module`` (deep-copied) or a zero-argument callable returning a
            fresh module.
        num_replicas: ``y >= 1``.
        init: ``"independent"``: each replica from its own initialisation (the factory called
            ``y`` times; for a module, replica 0 keeps the module's weights and replicas 1..y-1 are
            deep copies re-initialised by every submodule's ``reset_parameters``); ``"same"``: y
            copies of one initialisation.
        seed: if given, replica ``a`` is initialised under ``torch.manual_seed(seed + a)`` inside
            ``torch.random.fork_rng`` (the global RNG state is left as it was).

    Raises:
        ValueError: on a bad ``num_replicas`` or ``init``, or replicas of differing shapes.
        TypeError: if ``model_or_factory`` is neither a module nor a callable returning one.
    """

    def __init__(
        self,
        model_or_factory: nn.Module | Callable[[], nn.Module],
        num_replicas: int,
        init: str = "independent",
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"Invalid num_replicas value: {num_replicas} (expected an int >= 1)")
        if init not in _INITS:
            raise ValueError(f"Invalid init value: {init!r} (expected one of {_INITS})")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"Invalid seed value: {seed!r} (expected an int or None)")
        y = num_replicas
        mods: list[nn.Module] = []
        if isinstance(model_or_factory, nn.Module):
            base = model_or_factory
            for a in range(y):
                m = copy.deepcopy(base)
                if init == "independent" and a > 0:
                    with _seeded(None if seed is None else seed + a):
                        if _reset_all(m) == 0:
                            logger.warning("Replicas: no submodule has reset_parameters()")
                mods.append(m)
        elif callable(model_or_factory):
            if init == "same":
                with _seeded(seed):
                    first = model_or_factory()
                mods = [first] + [copy.deepcopy(first) for _ in range(y - 1)]
            else:
                for a in range(y):
                    with _seeded(None if seed is None else seed + a):
                        mods.append(model_or_factory())
            if not all(isinstance(m, nn.Module) for m in mods):
                raise TypeError("model_or_factory must return an nn.Module")
        else:
            raise TypeError(
                f"model_or_factory must be an nn.Module or a callable, got {type(model_or_factory)}"
            )
        self.replicas = nn.ModuleList(mods)
        self.backend = "loop"
        self._flatten()

    # ------------------------------------------------------------------ flat buffers
    def _flatten(self) -> None:
        """(Re)build the flat parameter and gradient buffers from the replicas' parameters."""
        ref = [(n, p) for n, p in self.replicas[0].named_parameters() if p.requires_grad]
        for a, r in enumerate(self.replicas):
            other = [(n, p) for n, p in r.named_parameters() if p.requires_grad]
            if [(n, p.shape) for n, p in other] != [(n, p.shape) for n, p in ref]:
                raise ValueError(f"replica {a} does not have the architecture of replica 0")
        keys: list[tuple[torch.dtype, torch.device]] = []
        layout: list[tuple[str, int, int, int, torch.Size]] = []
        sizes: list[int] = []
        for name, p in ref:
            key = (p.dtype, p.device)
            if key not in keys:
                keys.append(key)
                sizes.append(0)
            k = keys.index(key)
            layout.append((name, k, sizes[k], p.numel(), p.shape))
            sizes[k] += p.numel()
        y = len(self.replicas)
        flats = [torch.zeros(y, n, dtype=dt, device=dev) for (dt, dev), n in zip(keys, sizes)]
        grads = [torch.zeros_like(f) for f in flats]
        views: list[tuple[Tensor, Tensor]] = []
        with torch.no_grad():
            for a, r in enumerate(self.replicas):
                params = dict(r.named_parameters())
                for name, k, off, n, shape in layout:
                    p = params[name]
                    flats[k][a, off : off + n].copy_(p.reshape(-1))
                    if p.grad is not None:
                        grads[k][a, off : off + n].copy_(p.grad.reshape(-1))
                    p.data = flats[k][a, off : off + n].view(shape)
                    gview = grads[k][a, off : off + n].view(shape)
                    p.grad = gview
                    views.append((p, gview))
        for f, g in zip(flats, grads):
            f.requires_grad_(True)
            f.grad = g
        self._flat_params = flats
        self._flat_grads = grads
        self._layout = layout
        self._grad_views = views

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Replicas:
        super()._apply(fn, recurse)
        if hasattr(self, "_layout"):
            self._flatten()
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Replicas:
        # A plain deep copy would give each parameter its own storage: rebuild the views.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        skip = ("_flat_params", "_flat_grads", "_grad_views", "_center_cache")
        for key, value in self.__dict__.items():
            if key not in skip:
                new.__dict__[key] = copy.deepcopy(value, memo)
        new._flatten()
        return new

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.pop("_center_cache", None)
        self._flatten()

    @property
    def flat_params(self) -> list[Tensor]:
        """The flat ``[y, N]`` parameter buffers (leaf tensors; one per dtype/device)."""
        return list(self._flat_params)

    @property
    def flat_grads(self) -> list[Tensor]:
        """The flat ``[y, N]`` gradient buffers (the replica ``.grad`` tensors are views)."""
        return list(self._flat_grads)

    @torch.no_grad()
    def sync_grads(self) -> None:
        """Make every replica ``.grad`` a view of the flat gradient again.

        Needed only if something replaced a gradient tensor (``zero_grad(set_to_none=True)`` on
        a single replica, assignment to ``.grad``): its values are copied into the flat buffer (a
        missing gradient counts as zero). The optimizer calls this before every step.
        """
        for f, g in zip(self._flat_params, self._flat_grads):
            if f.grad is not g:
                if f.grad is not None:
                    g.copy_(f.grad)
                f.grad = g
        for p, view in self._grad_views:
            if p.grad is not view:
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad)
                p.grad = view

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradients in place (``set_to_none`` is ignored: the views must stay)."""
        del set_to_none
        for g in self._flat_grads:
            g.zero_()
        for r in self.replicas:
            for p in r.parameters():
                if not p.requires_grad and p.grad is not None:
                    p.grad = None

    # ------------------------------------------------------------------ container protocol
    def __len__(self) -> int:
        return len(self.replicas)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.replicas)

    def __getitem__(self, index: int) -> nn.Module:
        return self.replicas[index]

    @property
    def num_replicas(self) -> int:
        """``y``."""
        return len(self.replicas)

    # ------------------------------------------------------------------ forward
    def forward(self, xs: Tensor | Sequence[Tensor]) -> Tensor:
        """Replica ``a`` applied to ``xs[a]``; outputs stacked to ``[y, ...]`` (see forward_all)."""
        return self.forward_all(xs)

    def forward_all(self, xs: Tensor | Sequence[Tensor], backend: str | None = None) -> Tensor:
        """Apply replica ``a`` to ``xs[a]`` for every ``a``; return the stacked outputs.

        Args:
            xs: a tensor ``[y, B, ...]`` or a sequence of ``y`` tensors (one minibatch each).
            backend: ``"loop"`` (a Python loop over the replica modules) or ``"vmap"``
                (``torch.func.vmap`` of ``functional_call`` over the stacked parameters, which are
                strided views of the flat buffers; buffers such as BatchNorm statistics are
                stacked and written back). Both give the same numbers. Default: ``self.backend``.

        Raises:
            ValueError: on an unknown backend or a number of inputs other than ``y``.
        """
        backend = self.backend if backend is None else backend
        if backend not in _BACKENDS:
            raise ValueError(f"Invalid backend value: {backend!r} (expected one of {_BACKENDS})")
        if len(xs) != len(self.replicas):
            raise ValueError(
                f"expected {len(self.replicas)} inputs (one per replica), got {len(xs)}"
            )
        if backend == "loop":
            return torch.stack([r(x) for r, x in zip(self.replicas, xs)])
        return self._forward_vmap(xs if isinstance(xs, Tensor) else torch.stack(list(xs)))

    def _forward_vmap(self, xs: Tensor) -> Tensor:
        from torch.func import functional_call, vmap

        y = len(self.replicas)
        params: dict[str, Tensor] = {}
        for name, k, off, n, shape in self._layout:
            params[name] = self._flat_params[k][:, off : off + n].view(y, *shape)
        named = [dict(r.named_parameters()) for r in self.replicas]
        for name in named[0]:
            if name not in params:  # frozen parameters
                params[name] = torch.stack([nm[name] for nm in named])
        bufs_per = [dict(r.named_buffers()) for r in self.replicas]
        buffers = {name: torch.stack([b[name] for b in bufs_per]) for name in bufs_per[0]}
        module = self.replicas[0]

        def call(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(module, (p, b), (x,))

        out = vmap(call, randomness="different")(params, buffers, xs)
        with torch.no_grad():
            for name, stacked in buffers.items():
                for a in range(y):
                    if bufs_per[a][name].data_ptr() != stacked[a].data_ptr():
                        bufs_per[a][name].copy_(stacked[a])
        return out

    def ensemble_probs(self, x: Tensor) -> Tensor:
        """The output ensemble: ``mean_a softmax(replica_a(x))`` over the last dimension."""
        probs = [torch.softmax(r(x), dim=-1) for r in self.replicas]
        return torch.stack(probs).mean(0)

    # ------------------------------------------------------------------ centre
    @torch.no_grad()
    def mean_sq_distance(self) -> float:
        r"""``mean_a ||w_a - c||^2`` with ``c = mean_a w_a`` (trainable parameters)."""
        total = 0.0
        for f in self._flat_params:
            total += float((f - f.mean(0, keepdim=True)).pow(2).sum())
        return total / len(self.replicas)

    @torch.no_grad()
    def center(self) -> nn.Module:
        """The centre network: parameters = replica mean, BatchNorm statistics averaged.

        A module of the replicas' architecture, cached and refreshed on each call (so keep no
        reference across training steps expecting it to stay fixed). Floating-point buffers
        (running means and variances) are the replica mean; ``num_batches_tracked`` is the
        maximum; other integer buffers are taken from replica 0. Its train/eval mode follows
        this module's.
        """
        cache: nn.Module | None = self.__dict__.get("_center_cache")
        ref_params = dict(self.replicas[0].named_parameters())
        if cache is not None:
            cparams = dict(cache.named_parameters())
            if any(
                cparams[n].dtype != p.dtype or cparams[n].device != p.device
                for n, p in ref_params.items()
            ):
                cache = None
        if cache is None:
            cache = copy.deepcopy(self.replicas[0])
            for p in cache.parameters():
                p.grad = None
            self.__dict__["_center_cache"] = cache
        cparams = dict(cache.named_parameters())
        means = [f.mean(0) for f in self._flat_params]
        flat_names = set()
        for name, k, off, n, shape in self._layout:
            cparams[name].copy_(means[k][off : off + n].view(shape))
            flat_names.add(name)
        named = [dict(r.named_parameters()) for r in self.replicas]
        for name, p in cparams.items():
            if name not in flat_names:
                p.copy_(torch.stack([nm[name] for nm in named]).mean(0))
        bufs = [dict(r.named_buffers()) for r in self.replicas]
        for name, b in cache.named_buffers():
            stacked = torch.stack([bb[name] for bb in bufs])
            if b.is_floating_point() or b.is_complex():
                b.copy_(stacked.mean(0))
            elif name.endswith("num_batches_tracked"):
                b.copy_(stacked.max(0).values)
            else:
                b.copy_(stacked[0])
        cache.train(self.training)
        return cache

    def recalibrate_bn(
        self, loader: Iterable[Any], device: torch.device | str | None = None
    ) -> nn.Module:
        """The centre with BatchNorm statistics recomputed on ``loader`` (see :func:`update_bn`).

        The next :meth:`center` call overwrites them with replica averages again.
        """
        c = self.center()
        update_bn(loader, c, device=device)
        return c


@torch.no_grad()
def update_bn(
    loader: Iterable[Any], model: nn.Module, device: torch.device | str | None = None
) -> None:
    """Recompute BatchNorm running statistics as a cumulative average over ``loader``.

    Same semantics as ``torch.optim.swa_utils.update_bn`` (statistics reset, momentum ``None``
    during the pass, batches given as tensors or as tuples/lists whose first item is the input),
    but the train/eval mode of *every* submodule is restored afterwards.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return
    modes = {m: m.training for m in model.modules()}
    momenta = {}
    for bn in bns:
        bn.reset_running_stats()
        momenta[bn] = bn.momentum
        bn.momentum = None
    model.train()
    try:
        for batch in loader:
            if isinstance(batch, (list, tuple)):
                batch = batch[0]
            if device is not None:
                batch = batch.to(device)
            model(batch)
    finally:
        for bn, mom in momenta.items():
            bn.momentum = mom
        for m, mode in modes.items():
            m.training = mode


class ReplicatedSGD(Optimizer):
    r"""SGD on ``y`` replicas coupled to their centre (Replicated-SGD, "rSGD").

    Objective :math:`\sum_a E(w_a) + \frac{\gamma}{2}\sum_a \|w_a - c\|^2`,
    :math:`c = \frac{1}{y}\sum_a w_a`. Since :math:`\sum_a (w_a - c) = 0`, the gradient for
    replica ``a`` is exactly ``grad E(w_a) + gamma * (w_a - c)`` with ``c`` held constant. At
    step ``t`` (0-based, counted by the optimizer) with ``t % coupling_every == 0``, and
    ``K = coupling_every``::

        G_a = grad E(w_a; B_a) + K * gamma_t * (w_a - c)
        w_a <- torch.optim.SGD step with G_a        (momentum, nesterov, weight_decay per replica)

    and on the other steps ``G_a = grad E(w_a; B_a)``. Each replica takes its own minibatch:
    compute the replicas' losses, sum them, call ``backward()``, then ``step()`` (or pass that as
    a closure). The whole update runs as a few kernels on the flat ``[y, N]`` buffers of the
    :class:`Replicas` (one param group whose params are those buffers; the momentum buffers are
    ``[y, N]`` too). With ``gamma=0`` it is exactly ``y`` independent ``torch.optim.SGD`` runs.
    The coupling (and weight decay) is added to the flat gradient in place, so after ``step()``
    the replicas' ``.grad`` hold the full update direction ``G_a``. All replicas' parameters are
    one param group (the flat buffers), so hyperparameters are shared by all layers.

    Args:
        replicas: the :class:`Replicas` container to train.
        lr, momentum, nesterov, weight_decay: as in ``torch.optim.SGD`` (dampening 0).
        gamma: coupling :math:`\gamma_t >= 0`, in the param group (schedulers write it).
        coupling_every: ``K >= 1``.
        backend: ``"loop"`` or ``"vmap"``, used by :meth:`forward_all` (same numbers).

    Raises:
        TypeError: if ``replicas`` is not a :class:`Replicas`.
        ValueError: on an invalid hyperparameter.

    Example:
        >>> reps = Replicas(lambda: torch.nn.Linear(4, 2), 3, seed=0)
        >>> opt = ReplicatedSGD(reps, lr=0.1, gamma=1e-3)
        >>> xs, ys = torch.randn(3, 8, 4), torch.randint(0, 2, (3, 8))
        >>> opt.zero_grad()
        >>> out = reps.forward_all(xs)
        >>> ce = torch.nn.functional.cross_entropy
        >>> loss = ce(out.flatten(0, 1), ys.flatten(), reduction="sum")
        >>> loss.backward()
        >>> opt.step()
        >>> opt.grad_evals
        3
    """

    def __init__(
        self,
        replicas: Replicas,
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        gamma: float,
        coupling_every: int = 1,
        backend: str = "loop",
    ) -> None:
        if not isinstance(replicas, Replicas):
            raise TypeError(f"ReplicatedSGD needs a Replicas container, got {type(replicas)}")
        if backend not in _BACKENDS:
            raise ValueError(f"Invalid backend value: {backend!r} (expected one of {_BACKENDS})")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            gamma=gamma,
            coupling_every=coupling_every,
        )
        self._check_group(defaults)
        self.replicas = replicas
        self.backend = backend
        self.grad_evals = 0
        self.steps = 0
        super().__init__(replicas.flat_params, defaults)

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        check_sgd_args(group["lr"], group["momentum"], group["weight_decay"], group["nesterov"])
        check_nonneg("gamma", group["gamma"])
        k = group["coupling_every"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid coupling_every value: {k} (expected an int >= 1)")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group of flat buffers (validated like the constructor's arguments)."""
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def forward_all(self, xs: Tensor | Sequence[Tensor]) -> Tensor:
        """``replicas.forward_all(xs, backend=self.backend)``."""
        return self.replicas.forward_all(xs, backend=self.backend)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradients in place (``set_to_none`` ignored: the views must stay)."""
        self.replicas.zero_grad()

    def coupling_active(self, step: int | None = None) -> bool:
        """Whether the coupling is applied at (0-based) ``step`` (default: the next step) for
        the first param group."""
        t = self.steps if step is None else step
        return t % self.param_groups[0]["coupling_every"] == 0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Coupling (every ``K`` steps) + SGD step on all replicas.

        Args:
            closure: optional; zeroes the gradients, runs every replica on its own minibatch,
                backpropagates the summed loss and returns it.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.replicas.sync_grads()
        t = self.steps
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            k, gamma, wd = group["coupling_every"], group["gamma"], group["weight_decay"]
            # (with y = 1 the coupling is exactly zero: skip it, keeping plain SGD bitwise)
            if gamma != 0.0 and t % k == 0 and len(self.replicas) > 1:
                # G += K gamma (W - c) + wd W, folded into two in-place kernels per buffer.
                # c = sum_a w_a / y: the 1/y is folded into the kernel's alpha (one pass less).
                kg = k * gamma
                y = len(self.replicas)
                for w, g in zip(params, grads):
                    add_coupling_(g, w, w.sum(0, keepdim=True), kg, wd, y)
                wd = 0.0
            states = [self.state[p] for p in params]
            bufs = sgd_step_(
                params,
                grads,
                [s.get("momentum_buffer") for s in states],
                lr=group["lr"],
                momentum=group["momentum"],
                nesterov=group["nesterov"],
                weight_decay=wd,
            )
            if group["momentum"] != 0.0:
                for s, b in zip(states, bufs):
                    s["momentum_buffer"] = b
        self.steps += 1
        self.grad_evals += len(self.replicas)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Torch optimizer state (``[y, N]`` momenta) plus the step and gradient counters."""
        sd = super().state_dict()
        sd["replicated_sgd"] = {"grad_evals": self.grad_evals, "steps": self.steps}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`."""
        sd = dict(state_dict)
        extra = sd.pop("replicated_sgd", None)
        super().load_state_dict(sd)
        if extra is not None:
            self.grad_evals = int(extra["grad_evals"])
            self.steps = int(extra["steps"])
