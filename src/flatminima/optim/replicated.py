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

from flatminima.optim._common import (
    PassCounter,
    add_coupling_,
    check_nonneg,
    check_sgd_args,
    sgd_step_,
)

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
    a Python loop over tensors and replicas (see docs/design.md, "Performance notes"). Moving
    the module
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
        group_of = self._group_of([n for n, _ in ref])
        keys: list[tuple[int, torch.dtype, torch.device]] = []
        layout: list[tuple[str, int, int, int, torch.Size]] = []
        sizes: list[int] = []
        # buffers ordered by group, then by first appearance (a stable sort: default unchanged)
        for name, p in sorted(ref, key=lambda item: group_of[item[0]]):
            key = (group_of[name], p.dtype, p.device)
            if key not in keys:
                keys.append(key)
                sizes.append(0)
            k = keys.index(key)
            layout.append((name, k, sizes[k], p.numel(), p.shape))
            sizes[k] += p.numel()
        y = len(self.replicas)
        flats = [torch.zeros(y, n, dtype=dt, device=dev) for (_, dt, dev), n in zip(keys, sizes)]
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
        self._flat_group_ids = [k[0] for k in keys]
        self._layout = layout
        self._grad_views = views

    def _group_of(self, names: list[str]) -> dict[str, int]:
        """Group index of every trainable parameter name (all 0 unless :meth:`regroup` ran)."""
        groups: list[list[str]] | None = self.__dict__.get("_groups")
        if groups is None:
            return dict.fromkeys(names, 0)
        index = {n: i for i, g in enumerate(groups) for n in g}
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(f"parameters in no group: {missing}")
        return {n: index[n] for n in names}

    def regroup(self, groups: Sequence[Sequence[str]] | None) -> None:
        """Lay the flat buffers out by parameter group: one ``[y, N_i]`` buffer per group i.

        Each group is a list of parameter names (as in ``replicas[0].named_parameters()``) that
        together cover every trainable parameter once; ``None`` restores the default layout
        (one buffer per dtype/device). :attr:`flat_params` are ordered by group, then by
        (dtype, device) in order of first appearance; :attr:`flat_groups` maps them. The
        parameter objects stay the same; an optimizer built earlier on :attr:`flat_params`
        no longer sees them (build it afterwards, as :class:`ReplicatedSGD` does).

        Raises:
            ValueError: if a name is unknown, repeated or missing.
        """
        if groups is not None:
            known = [n for n, p in self.replicas[0].named_parameters() if p.requires_grad]
            flat = [n for g in groups for n in g]
            unknown = sorted(set(flat) - set(known))
            repeated = sorted({n for n in flat if flat.count(n) > 1})
            if unknown or repeated:
                raise ValueError(
                    f"Invalid groups: unknown names {unknown}, repeated names {repeated} "
                    f"(expected each of {known} once)"
                )
            groups = [list(g) for g in groups]
        old = self.__dict__.get("_groups")
        self.__dict__["_groups"] = groups
        try:
            self._flatten()
        except ValueError:
            self.__dict__["_groups"] = old
            raise

    @property
    def flat_groups(self) -> list[list[int]]:
        """For each parameter group (see :meth:`regroup`), the indices of its flat buffers."""
        out: list[list[int]] = []
        for k, gid in enumerate(self._flat_group_ids):
            while len(out) <= gid:
                out.append([])
            out[gid].append(k)
        return out

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Replicas:
        # Re-flatten only when the parameters moved to new storage (a real .to()/.double()): a
        # no-op .to() (frameworks call model.to(device) after the optimizer exists) must keep
        # the flat buffers that the optimizer holds.
        before = [(p.data_ptr(), p.dtype, p.device) for p in self.parameters()]
        super()._apply(fn, recurse)
        after = [(p.data_ptr(), p.dtype, p.device) for p in self.parameters()]
        if hasattr(self, "_layout") and after != before:
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


_FUSED = (None, "compile")
_SGD_KEYS = ("lr", "momentum", "nesterov", "weight_decay", "gamma", "coupling_every")
# torch optimizers that are not elementwise (factored or whole-tensor statistics) or need a
# closure of their own: on flat [y, N] buffers they would mix replicas and layers.
_NOT_ELEMENTWISE = ("LBFGS", "Adafactor", "SparseAdam")


def _as_replicas(obj: Any) -> Replicas:
    """``obj`` itself if a :class:`Replicas`, else its ``.replicas`` (a ReplicatedModule)."""
    if isinstance(obj, Replicas):
        return obj
    inner = getattr(obj, "replicas", None)
    if isinstance(inner, Replicas):
        return inner
    raise TypeError(
        f"ReplicatedSGD needs a Replicas container or a ReplicatedModule, got {type(obj)}"
    )


def _check_coupling(group: dict[str, Any]) -> None:
    check_nonneg("gamma", group["gamma"])
    k = group["coupling_every"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid coupling_every value: {k} (expected an int >= 1)")


def _check_sgd_group(group: dict[str, Any], strict: bool = False) -> None:
    """Validate a built-in-path group; ``strict``: also refuse keys it does not use."""
    unknown = sorted(set(group) - set(_SGD_KEYS) - {"params"})
    if strict and unknown:
        raise ValueError(
            f"Invalid param group keys {unknown} for the built-in SGD update (expected some of "
            f"{_SGD_KEYS}; pass base_optimizer to use another optimizer's options)"
        )
    check_sgd_args(group["lr"], group["momentum"], group["weight_decay"], group["nesterov"])
    _check_coupling(group)


def _check_base(base_optimizer: Any, base_kwargs: Any) -> dict[str, Any]:
    """Validate ``base_optimizer``/``base_kwargs``; return a copy of the kwargs."""
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
        raise TypeError(
            f"Invalid base_optimizer value: {base_optimizer!r} (expected a subclass of "
            "torch.optim.Optimizer such as torch.optim.AdamW, or None)"
        )
    if base_optimizer.__name__ in _NOT_ELEMENTWISE or issubclass(base_optimizer, ReplicatedSGD):
        raise ValueError(
            f"Invalid base_optimizer value: {base_optimizer.__name__} (the base update runs on "
            "flat [y, N] buffers, so it must act elementwise: SGD, Adam, AdamW, RMSprop, ...)"
        )
    if base_kwargs is None:
        return {}
    if not isinstance(base_kwargs, dict):
        raise TypeError(f"Invalid base_kwargs value: {base_kwargs!r} (expected a dict or None)")
    if "params" in base_kwargs:
        raise ValueError("Invalid base_kwargs: 'params' is set by ReplicatedSGD")
    return dict(base_kwargs)


def _check_base_group(
    base_optimizer: type[Optimizer], kwargs: dict[str, Any], group: dict[str, Any]
) -> None:
    """Run ``base_optimizer``'s own argument checks on a group's values (a throwaway instance).

    torch optimizers validate only their constructor's arguments, not per-group values, so the
    group's options are passed as constructor arguments over a dummy parameter.
    """
    opts = {k: v for k, v in group.items() if k not in ("params", "gamma", "coupling_every")}
    dummy = torch.zeros(1, requires_grad=True)
    try:
        base_optimizer([dummy], **{**kwargs, **opts})
    except TypeError as exc:  # an option the constructor does not take: leave it to the base
        logger.debug("base optimizer group check skipped: %s", exc)


def _resolve_groups(
    replicas: Replicas, param_groups: Any
) -> list[tuple[list[str], dict[str, Any]]]:
    """``param_groups`` over replica 0's parameters -> (names, options) per group."""
    if isinstance(param_groups, (dict, Tensor)) or not isinstance(param_groups, Iterable):
        raise TypeError(
            f"Invalid param_groups value: {type(param_groups)} (expected a list of dicts with "
            "'params' taken from replicas[0].parameters())"
        )
    name_of = {id(p): n for n, p in replicas[0].named_parameters() if p.requires_grad}
    seen: set[str] = set()
    out: list[tuple[list[str], dict[str, Any]]] = []
    for i, group in enumerate(param_groups):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"param group {i} must be a dict with a 'params' entry, got {group!r}")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if not params:
            raise ValueError(f"param group {i} has no parameters")
        names = []
        for p in params:
            name = name_of.get(id(p))
            if name is None:
                raise ValueError(
                    f"param group {i}: a tensor of shape {tuple(getattr(p, 'shape', ()))} is not "
                    "a trainable parameter of replicas[0] (groups are given over replica 0's "
                    "parameters and apply to the same slots of every replica)"
                )
            if name in seen:
                raise ValueError(f"param group {i}: parameter {name!r} is in more than one group")
            seen.add(name)
            names.append(name)
        out.append((names, {k: v for k, v in group.items() if k != "params"}))
    missing = [n for n in name_of.values() if n not in seen]
    if missing:
        raise ValueError(f"Invalid param_groups: parameters in no group: {missing}")
    return out


# ---------------------------------------------------------------------- opt-in compiled update
_COMPILED: dict[str, Any] = {}


def _fused_update(
    w: Tensor,
    g: Tensor,
    buf: Tensor | None,
    total: Tensor | None,
    s: Tensor,
    y: int,
    nesterov: bool,
) -> None:
    """Coupling + weight decay + momentum + update in place, ``s = [K gamma, wd, lr, mom]``.

    ``d = g + (K gamma + wd) w - (K gamma / y) total`` with ``total = sum_a w_a`` (or
    ``d = g + wd w`` when ``total`` is None); ``buf <- mom buf + d``; ``w <- w - lr (d + mom buf)``
    (Nesterov) or ``w - lr buf`` (or ``w - lr d`` without momentum); ``g <- d`` (Nesterov:
    ``g <- d + mom buf``, as the eager kernels leave it). ``total`` is
    computed outside and everything is viewed as 1-D (the centre broadcast as an expanded
    index), so that inductor emits ONE elementwise loop with no temporary buffer.
    """
    kg, wd, lr, mom = s[0], s[1], s[2], s[3]
    w1, g1 = w.view(-1), g.view(-1)
    if total is not None:
        n = total.shape[-1]
        tot = total.view(1, n).expand(y, n).reshape(-1)
        d = g1 + (kg + wd) * w1 - (kg / y) * tot
    else:
        d = g1 + wd * w1
    if buf is None:
        upd = d
    else:
        b = buf.view(-1) * mom + d
        upd = d + mom * b if nesterov else b
        buf.view(-1).copy_(b)
    new_w = w1 - lr * upd
    g1.copy_(upd if buf is not None and nesterov else d)  # what the eager kernels leave there
    w1.copy_(new_w)


def _compiled_update() -> Callable[..., None] | None:
    """``torch.compile(_fused_update)``, or None where torch.compile cannot run here."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = None
        try:
            fn = torch.compile(_fused_update, dynamic=False, fullgraph=True)
            w, g = torch.ones(2, 4), torch.ones(2, 4)
            fn(w, g, torch.zeros(2, 4), w.sum(0), torch.tensor([1.0, 0.0, 0.5, 0.9]), 2, False)
            _COMPILED["fn"] = fn
        except Exception as exc:  # noqa: BLE001 - any compiler failure means "not available"
            logger.warning("torch.compile is not available (%s): using the eager kernels", exc)
    return _COMPILED["fn"]


def compile_available() -> bool:
    """Whether the opt-in ``fused="compile"`` update of :class:`ReplicatedSGD` can run here."""
    return _compiled_update() is not None


class ReplicatedSGD(Optimizer, PassCounter):
    r"""SGD (or any elementwise base optimizer) on ``y`` replicas coupled to their centre.

    Replicated-SGD ("rSGD"). Objective :math:`\sum_a E(w_a) + \frac{\gamma}{2}\sum_a
    \|w_a - c\|^2`, :math:`c = \frac{1}{y}\sum_a w_a`. Since :math:`\sum_a (w_a - c) = 0`, the
    gradient for replica ``a`` is exactly ``grad E(w_a) + gamma * (w_a - c)`` with ``c`` held
    constant. At step ``t`` (0-based, counted by the optimizer) with ``t % coupling_every == 0``,
    and ``K = coupling_every``::

        G_a = grad E(w_a; B_a) + K * gamma_t * (w_a - c)
        w_a <- torch.optim.SGD step with G_a        (momentum, nesterov, weight_decay per replica)

    and on the other steps ``G_a = grad E(w_a; B_a)``. With ``base_optimizer`` (e.g.
    ``torch.optim.AdamW``) the second line is ``base.step()`` with the gradient ``G_a`` (the base
    optimizer's own weight decay, moments, ...). Each replica takes its own minibatch: compute
    the replicas' losses, sum them, call ``backward()``, then ``step()`` (or pass that as a
    closure; or use :class:`~flatminima.optim.ReplicatedModule` in any training loop). The update
    runs as a few kernels on the flat ``[y, N]`` buffers of the :class:`Replicas` (the momentum or
    Adam moments are ``[y, N]`` too). With ``gamma=0`` it is exactly ``y`` independent runs of the
    base update. The coupling (and weight decay of the built-in path) is added to the flat gradient
    in place, so after ``step()`` the replicas' ``.grad`` hold ``G_a`` plus weight decay (with
    Nesterov: the update direction ``G_a + wd w_a + momentum * buf_a``).

    Param groups are given over ONE replica's parameters and apply to the same slots of every
    replica, e.g. no weight decay on biases::

        named = list(replicas[0].named_parameters())
        groups = [{"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
                  {"params": [p for n, p in named if not n.endswith("bias")]}]

    They must cover every trainable parameter once; the :class:`Replicas` flat buffers are then
    laid out with one ``[y, N_i]`` buffer per group (:meth:`Replicas.regroup`), and
    ``self.param_groups[i]["params"]`` are group i's flat buffers. ``gamma`` and
    ``coupling_every`` live in every param group (coupling schedulers write ``group["gamma"]``).

    Args:
        replicas: the :class:`Replicas` container to train (or a ``ReplicatedModule``).
        lr, momentum, nesterov, weight_decay: as in ``torch.optim.SGD`` (dampening 0). With a
            base optimizer only ``lr`` is used (the others go in ``base_kwargs``).
        gamma: coupling :math:`\gamma_t >= 0`, in the param groups (schedulers write it).
        coupling_every: ``K >= 1``.
        backend: ``"loop"`` or ``"vmap"``, used by :meth:`forward_all` (same numbers).
        base_optimizer: None (the built-in fused SGD update) or an elementwise
            ``torch.optim.Optimizer`` subclass, built over the flat buffers.
        base_kwargs: keyword arguments of ``base_optimizer`` (``lr`` defaults to ``lr``).
        param_groups: None (one group) or a list of dicts over ``replicas[0]``'s parameters.
        fused: None (eager kernels, the reference numbers) or ``"compile"``: the built-in update
            as one ``torch.compile`` kernel per buffer (agrees to float rounding; falls back to
            the eager kernels with a warning where torch.compile cannot run).

    Raises:
        TypeError: if ``replicas`` is not a :class:`Replicas`, or on a bad base optimizer or
            param group type.
        ValueError: on an invalid hyperparameter or param group.

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
        >>> adamw = ReplicatedSGD(reps, lr=1e-3, gamma=1e-3, base_optimizer=torch.optim.AdamW,
        ...                       base_kwargs={"weight_decay": 0.01})
        >>> type(adamw.base).__name__, len(adamw.param_groups)
        ('AdamW', 1)
        >>> named = list(reps[0].named_parameters())
        >>> groups = [{"params": [p for n, p in named if n == "bias"], "weight_decay": 0.0},
        ...           {"params": [p for n, p in named if n != "bias"]}]
        >>> opt = ReplicatedSGD(reps, lr=0.1, weight_decay=1e-4, gamma=1e-3, param_groups=groups)
        >>> [tuple(g["params"][0].shape) for g in opt.param_groups]  # one [y, N_i] per group
        [(3, 2), (3, 8)]
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
        base_optimizer: type[Optimizer] | None = None,
        base_kwargs: dict[str, Any] | None = None,
        param_groups: Iterable[dict[str, Any]] | None = None,
        fused: str | None = None,
    ) -> None:
        replicas = _as_replicas(replicas)
        if backend not in _BACKENDS:
            raise ValueError(f"Invalid backend value: {backend!r} (expected one of {_BACKENDS})")
        if fused not in _FUSED:
            raise ValueError(f"Invalid fused value: {fused!r} (expected one of {_FUSED})")
        coupling = dict(gamma=gamma, coupling_every=coupling_every)
        if base_optimizer is None:
            if base_kwargs:
                raise ValueError("base_kwargs given without base_optimizer")
            defaults = dict(
                lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, **coupling
            )
            _check_sgd_group(defaults)
        else:
            kwargs = _check_base(base_optimizer, base_kwargs)
            if fused is not None:
                raise ValueError(
                    f"Invalid fused value: {fused!r} (applies to the built-in update only; "
                    "use the base optimizer's own options, e.g. fused=True for AdamW on a GPU)"
                )
            if momentum != 0.0 or nesterov or weight_decay != 0.0:
                raise ValueError(
                    "momentum, nesterov and weight_decay belong in base_kwargs when a "
                    f"base_optimizer is given (got {momentum}, {nesterov}, {weight_decay})"
                )
            check_nonneg("learning rate", lr)
            _check_coupling(coupling)
            defaults = dict(lr=lr, **coupling)
        self.replicas = replicas
        self.backend = backend
        self.fused = fused
        self.grad_evals = 0  # backward passes of one minibatch (alias: passes)
        self.steps = 0
        self.base: Optimizer | None = None
        self._ready = False
        kwargs = {} if base_optimizer is None else kwargs
        self._base_kwargs = kwargs
        groups = self._flat_param_groups(param_groups, defaults, base_optimizer, kwargs)
        if base_optimizer is None:
            super().__init__(groups, defaults)
        else:
            self._init_base(base_optimizer, kwargs, groups, defaults, param_groups)
        self._ready = True

    def _flat_param_groups(
        self,
        param_groups: Any,
        defaults: dict[str, Any],
        base_optimizer: type[Optimizer] | None,
        base_kwargs: dict[str, Any],
    ) -> list[dict[str, Any]]:
        """Validate ``param_groups`` and regroup the replicas' flat buffers to match them."""
        reps = self.replicas
        if param_groups is None:
            return [{"params": reps.flat_params}]
        resolved = _resolve_groups(reps, param_groups)
        for i, (_, opts) in enumerate(resolved):
            try:
                if base_optimizer is None:
                    _check_sgd_group({**defaults, **opts}, strict=True)
                else:
                    _check_coupling({**defaults, **opts})
                    _check_base_group(base_optimizer, base_kwargs, opts)
            except ValueError as exc:
                raise ValueError(f"param group {i}: {exc}") from None
        reps.regroup([names for names, _ in resolved])
        flats = reps.flat_params
        return [
            {"params": [flats[k] for k in idx], **opts}
            for idx, (_, opts) in zip(reps.flat_groups, resolved)
        ]

    def _init_base(
        self,
        base_optimizer: type[Optimizer],
        kwargs: dict[str, Any],
        groups: list[dict[str, Any]],
        defaults: dict[str, Any],
        param_groups: Any,
    ) -> None:
        """Build the base optimizer over the flat groups; share its param-group dicts."""
        kwargs.setdefault("lr", defaults["lr"])
        try:
            self.base = base_optimizer(groups, **kwargs)
        except Exception:
            if param_groups is not None:
                self.replicas.regroup(None)
            raise
        # our groups ARE the base's groups (same dicts): schedulers writing lr or gamma reach both
        super().__init__(self.base.param_groups, defaults)
        self.param_groups = self.base.param_groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group of flat buffers, validated BEFORE it is appended.

        Raises:
            TypeError: if ``param_group`` is not a dict.
            ValueError: on an invalid value (``param_groups`` is then unchanged).
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group)}")
        trial = {**self.defaults, **param_group}
        if self.base is None:
            _check_sgd_group(trial)
        else:
            _check_coupling(trial)
            _check_base_group(type(self.base), self._base_kwargs, param_group)
        if self.base is not None and self._ready:
            for key in ("gamma", "coupling_every"):
                param_group.setdefault(key, self.defaults[key])
            self.base.add_param_group(param_group)  # appends to the shared list
            return
        super().add_param_group(param_group)

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
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Coupling (every ``K`` steps) + base update on all replicas.

        Args:
            closure: optional; zeroes the gradients, runs every replica on its own minibatch,
                backpropagates the summed loss and returns it. If it raises, the weights, the
                optimizer state and the counters are left as they were.

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
            if self.base is None:
                self._sgd_group(group, t)
            else:
                self._couple_group(group, t)
        if self.base is not None:
            self.base.step()
        self.steps += 1
        self.grad_evals += len(self.replicas)
        return loss

    def _couple_group(self, group: dict[str, Any], t: int) -> None:
        """``G += K gamma (W - c)`` on the group's flat gradients (base-optimizer path)."""
        k, gamma, y = group["coupling_every"], group["gamma"], len(self.replicas)
        if gamma != 0.0 and t % k == 0 and y > 1:
            for w in group["params"]:
                if w.grad is not None:
                    add_coupling_(w.grad, w, w.sum(0, keepdim=True), k * gamma, 0.0, y)

    def _sgd_group(self, group: dict[str, Any], t: int) -> None:
        """The built-in update of one param group (coupling + torch.optim.SGD step)."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        k, gamma, wd = group["coupling_every"], group["gamma"], group["weight_decay"]
        y = len(self.replicas)
        # (with y = 1 the coupling is exactly zero: skip it, keeping plain SGD bitwise)
        couple = gamma != 0.0 and t % k == 0 and y > 1
        states = [self.state[p] for p in params]
        if self.fused == "compile" and self._sgd_group_compiled(group, params, states, couple):
            return
        if couple:
            # G += K gamma (W - c) + wd W, folded into two in-place kernels per buffer.
            # c = sum_a w_a / y: the 1/y is folded into the kernel's alpha (one pass less).
            for w, g in zip(params, grads):
                add_coupling_(g, w, w.sum(0, keepdim=True), k * gamma, wd, y)
            wd = 0.0
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

    def _sgd_group_compiled(
        self, group: dict[str, Any], params: list[Tensor], states: list[dict], couple: bool
    ) -> bool:
        """The built-in update through the compiled kernel; False where it cannot run."""
        fn = _compiled_update()
        mom = group["momentum"]
        if fn is None or (mom != 0.0 and any("momentum_buffer" not in s for s in states)):
            return False  # first momentum step (buffer = G, as torch) or no compiler: eager
        kg = group["coupling_every"] * group["gamma"] if couple else 0.0
        for w, s in zip(params, states):
            scal = torch.tensor(
                [kg, group["weight_decay"], group["lr"], mom], dtype=w.dtype, device=w.device
            )
            buf = s["momentum_buffer"] if mom != 0.0 else None
            total = w.sum(0, keepdim=True) if couple else None
            fn(w.detach(), w.grad, buf, total, scal, len(self.replicas), group["nesterov"])
        return True

    def state_dict(self) -> dict[str, Any]:
        """Torch optimizer state (``[y, N]`` momenta) plus the counters (and the base's state)."""
        sd = super().state_dict()
        base = None if self.base is None else type(self.base).__name__
        sd["replicated_sgd"] = {"grad_evals": self.grad_evals, "steps": self.steps, "base": base}
        if self.base is not None:
            sd["base"] = self.base.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; everything is checked before anything is changed.

        Raises:
            TypeError: if ``state_dict`` is not a dict.
            ValueError: if it is not a ReplicatedSGD state of the same layout (another
                optimizer's state, another base optimizer, other groups or buffer shapes).
        """
        extra = self._check_loadable(state_dict)
        sd = {k: v for k, v in state_dict.items() if k not in ("replicated_sgd", "base")}
        if self.base is None:
            super().load_state_dict(sd)
        else:
            self.base.load_state_dict(state_dict["base"])
            self.param_groups = self.base.param_groups
        self.grad_evals = int(extra["grad_evals"])
        self.steps = int(extra["steps"])

    def _check_loadable(self, state_dict: Any) -> dict[str, Any]:
        """Validate a state dict against this optimizer; return its 'replicated_sgd' entry."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict)}")
        extra = state_dict.get("replicated_sgd")
        if not isinstance(extra, dict) or not {"grad_evals", "steps"} <= set(extra):
            others = [k for k in state_dict if k not in ("state", "param_groups")]
            raise ValueError(
                "not a ReplicatedSGD state dict (no 'replicated_sgd' entry; extra keys "
                f"{others}): the state of another optimizer cannot be loaded"
            )
        mine = None if self.base is None else type(self.base).__name__
        if extra.get("base") != mine or (mine is not None and "base" not in state_dict):
            raise ValueError(
                f"state dict of a ReplicatedSGD with base optimizer {extra.get('base')}, "
                f"this one has {mine}"
            )
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(
                f"state dict has {len(groups) if isinstance(groups, list) else groups!r} param "
                f"groups, this optimizer has {len(self.param_groups)}"
            )
        for i, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved.get("params", ())) != len(group["params"]):
                raise ValueError(f"param group {i} holds another number of flat buffers")
            try:
                _check_sgd_group(saved) if self.base is None else _check_coupling(saved)
            except (KeyError, ValueError) as exc:
                raise ValueError(f"state dict param group {i} is invalid: {exc!r}") from None
        if self.base is None:
            self._check_saved_buffers(state_dict)
        return extra

    def _check_saved_buffers(self, state_dict: dict[str, Any]) -> None:
        """Every saved momentum buffer has its flat buffer's shape."""
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        shape_of = {i: p.shape for i, p in zip(ids, params)}
        for i, st in state_dict.get("state", {}).items():
            buf = st.get("momentum_buffer") if isinstance(st, dict) else None
            if set(st) - {"momentum_buffer"} or (
                buf is not None and (i not in shape_of or buf.shape != shape_of[i])
            ):
                raise ValueError(
                    f"state entry {i} ({sorted(st)}) does not fit a flat buffer of shape "
                    f"{tuple(shape_of.get(i, ()))}"
                )
