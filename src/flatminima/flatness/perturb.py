"""Shared machinery of the flatness measures: parameter selection, data, state, perturbations.

Every measure in :mod:`flatminima.flatness` follows the same contract:

* the model comes back bit for bit as it was (parameters, buffers, train/eval mode of every
  submodule, ``requires_grad`` flags), also when an exception is raised mid-measure;
* the caller's global random state (torch CPU/CUDA, numpy) is unchanged: randomness comes from
  a private :class:`torch.Generator` seeded by the ``seed`` argument;
* parameters are modified **in place** (``copy_``/``_foreach`` ops under ``no_grad``), never
  rebound through ``.data``, so the measures also work on modules whose parameters are views
  into a flat buffer (the replicas of :class:`flatminima.optim.ReplicatedSGD`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "ParamFilter",
    "Batches",
    "select_parameters",
    "materialize_batches",
    "ModelSnapshot",
    "preserve_state",
    "preserve_global_rng",
    "NoisePerturber",
    "mean_and_stderr",
    "model_device",
]

#: Which parameters a measure acts on: ``None`` (all), an iterable of parameter names as in
#: ``model.named_parameters()``, or a predicate ``(name, parameter) -> bool``.
ParamFilter = Iterable[str] | Callable[[str, nn.Parameter], bool] | None

#: Data materialised on the device once: a list of ``(inputs, targets)`` batches.
Batches = list[tuple[Tensor, Tensor]]

_VALID_NOISE = ("multiplicative", "additive")


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters or buffers)."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def select_parameters(model: nn.Module, params: ParamFilter = None) -> list[tuple[str, Tensor]]:
    """Return the ``(name, parameter)`` pairs of ``model`` selected by ``params``.

    Args:
        model: the network.
        params: ``None`` for all parameters; an iterable of names (each must exist in
            ``model.named_parameters()``); or a predicate ``(name, parameter) -> bool``.

    Raises:
        ValueError: the model has no parameters, a name does not exist, or the filter selects
            nothing.
    """
    named: list[tuple[str, Tensor]] = list(model.named_parameters())
    if not named:
        raise ValueError(f"model {type(model).__name__} has no parameters to measure")
    if params is None:
        return named
    if callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]  # type: ignore[arg-type]
    elif isinstance(params, str):
        raise ValueError(
            f"params={params!r} is a single string; pass an iterable of names, e.g. [{params!r}]"
        )
    else:
        wanted = list(params)
        by_name = dict(named)
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise ValueError(
                f"unknown parameter names {unknown}; valid names are {sorted(by_name)}"
            )
        keep = set(wanted)
        chosen = [(n, p) for n, p in named if n in keep]
    if not chosen:
        raise ValueError("the parameter filter selected no parameters")
    return chosen


def _split_batch(batch: object) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        raise ValueError("dict batches are not supported; yield (inputs, targets) pairs")
    if not isinstance(batch, Sequence) or len(batch) < 2:
        raise ValueError(
            f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}"
        )
    x, y = batch[0], batch[1]
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError(
            f"batch items must be tensors, got ({type(x).__name__}, {type(y).__name__})"
        )
    return x, y


def materialize_batches(
    data: object,
    *,
    max_samples: int | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> Batches:
    """Collect ``data`` once into a list of ``(x, y)`` batches on ``device``.

    Args:
        data: an ``(inputs, targets)`` pair of tensors with the same first dimension (split into
            ``batch_size`` chunks), or any iterable of ``(x, y)`` batches (a ``DataLoader``).
            Iterating a shuffling ``DataLoader`` consumes the global RNG; callers wrap this in
            :func:`preserve_global_rng`.
        max_samples: keep only the first ``max_samples`` samples (the last batch is cut).
        batch_size: chunk size for tensor pairs (ignored for iterables).
        device: target device (``None`` leaves tensors where they are).

    Raises:
        ValueError: empty data, a malformed batch, ``max_samples < 1`` or ``batch_size < 1``.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], Tensor)
        and isinstance(data[1], Tensor)
    ):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"inputs and targets differ in length: {x.shape[0]} vs {y.shape[0]}")
        n = x.shape[0] if max_samples is None else min(x.shape[0], max_samples)
        it: Iterable[object] = [
            (x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)
        ]
    elif isinstance(data, Iterable):
        it = data
    else:
        raise ValueError(
            f"data must be an (inputs, targets) pair of tensors or an iterable of batches, "
            f"got {type(data).__name__}"
        )
    out: Batches = []
    seen = 0
    for batch in it:
        bx, by = _split_batch(batch)
        if max_samples is not None and seen + bx.shape[0] > max_samples:
            keep = max_samples - seen
            bx, by = bx[:keep], by[:keep]
        if bx.shape[0] == 0:
            continue
        if device is not None:
            bx, by = bx.to(device, non_blocking=True), by.to(device, non_blocking=True)
        out.append((bx, by))
        seen += bx.shape[0]
        if max_samples is not None and seen >= max_samples:
            break
    if not out:
        raise ValueError("data is empty: no samples to measure on")
    return out


@dataclass
class ModelSnapshot:
    """Exact copy of a model's mutable state, restorable in place.

    Stores clones of all parameters and buffers, every submodule's ``training`` flag and every
    parameter's ``requires_grad``. :meth:`restore` writes the values back with ``copy_`` under
    ``no_grad`` (parameters that are views into a flat buffer stay views).
    """

    params: list[Tensor]
    param_values: list[Tensor]
    requires_grad: list[bool]
    buffers: list[Tensor]
    buffer_values: list[Tensor]
    modes: list[tuple[nn.Module, bool]]

    @classmethod
    def take(cls, model: nn.Module, *, buffers_only: bool = False) -> ModelSnapshot:
        """Snapshot ``model`` (``buffers_only`` skips cloning the parameters)."""
        params: list[Tensor] = list(model.parameters())
        bufs = [b for b in model.buffers()]
        with torch.no_grad():
            pvals = [] if buffers_only else [p.detach().clone() for p in params]
            bvals = [b.detach().clone() for b in bufs]
        return cls(
            params=params,
            param_values=pvals,
            requires_grad=[p.requires_grad for p in params],
            buffers=bufs,
            buffer_values=bvals,
            modes=[(m, m.training) for m in model.modules()],
        )

    def restore(self) -> None:
        """Write the saved values, flags and modes back into the model, in place."""
        with torch.no_grad():
            if self.param_values:
                for p, v in zip(self.params, self.param_values):
                    p.copy_(v)
            for b, v in zip(self.buffers, self.buffer_values):
                b.copy_(v)
        for p, rg in zip(self.params, self.requires_grad):
            if p.requires_grad != rg:
                p.requires_grad_(rg)
        for m, training in self.modes:
            m.training = training


@contextlib.contextmanager
def preserve_global_rng(devices: Iterable[torch.device] = ()) -> Iterator[None]:
    """Restore the global torch (CPU and the given CUDA devices) and numpy RNG states on exit."""
    cuda = sorted(
        {
            d.index if d.index is not None else torch.cuda.current_device()
            for d in devices
            if d.type == "cuda"
        }
    )
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda, enabled=True):
            yield
    finally:
        np.random.set_state(np_state)


@contextlib.contextmanager
def preserve_state(model: nn.Module, *, params: bool = True) -> Iterator[ModelSnapshot]:
    """Context manager: snapshot ``model`` and the global RNGs, restore both on exit.

    Restoration also happens when the body raises, so a measure interrupted by a failing loss
    function leaves the model as it found it.
    """
    snap = ModelSnapshot.take(model, buffers_only=not params)
    devices = {t.device for t in snap.params} | {t.device for t in snap.buffers}
    try:
        with preserve_global_rng(devices):
            yield snap
    finally:
        snap.restore()


class NoisePerturber:
    """Perturb a fixed list of tensors in place and restore them exactly.

    Multiplicative noise: ``w <- w0 * (1 + sigma * xi)``; additive: ``w <- w0 + sigma * xi``,
    ``xi ~ N(0, I)``. The reference ``w0`` is saved once at construction; :meth:`perturb_`
    restores ``w0`` and applies one fresh draw, :meth:`restore_` writes ``w0`` back. Noise for a
    draw is one flat ``randn`` per (device, dtype) group, split into views; the updates are
    ``torch._foreach`` ops, so the cost is a few memory passes over the parameters.

    Args:
        tensors: the tensors to perturb (parameters; may be views into a flat buffer).
        noise: ``"multiplicative"`` or ``"additive"``.

    Raises:
        ValueError: unknown ``noise``.
    """

    def __init__(self, tensors: Sequence[Tensor], noise: str = "multiplicative") -> None:
        if noise not in _VALID_NOISE:
            raise ValueError(f"noise must be one of {_VALID_NOISE}, got {noise!r}")
        self.noise = noise
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.device, t.dtype), []).append(t)
        self._groups = []
        with torch.no_grad():
            for (dev, dtype), ts in groups.items():
                saved = [t.detach().clone() for t in ts]
                self._groups.append((dev, dtype, ts, saved, sum(t.numel() for t in ts)))
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device)
            self._generators[device] = g
        g.manual_seed(seed)
        return g

    @torch.no_grad()
    def draw(self, seed: int) -> list[Tensor]:
        """One draw of ``xi ~ N(0, I)``: a flat tensor per (device, dtype) group, from ``seed``.

        Drawing once and applying it for several sigmas (:meth:`apply_`) makes the noise
        generation cost per draw, not per (draw, sigma).
        """
        return [
            torch.randn(numel, generator=self._generator(dev, seed), device=dev, dtype=dtype)
            for dev, dtype, _, _, numel in self._groups
        ]

    @torch.no_grad()
    def apply_(self, sigma: float, xi: Sequence[Tensor | None]) -> None:
        """Set the tensors to ``w0 * (1 + sigma xi)`` (or ``w0 + sigma xi``) for a drawn ``xi``."""
        for (_, _, ts, saved, _), flat in zip(self._groups, xi):
            torch._foreach_copy_(ts, saved)
            if sigma == 0.0 or flat is None:
                continue
            views = [c.view_as(t) for c, t in zip(flat.split([t.numel() for t in ts]), ts)]
            if self.noise == "multiplicative":
                torch._foreach_addcmul_(ts, saved, views, value=sigma)
            else:
                torch._foreach_add_(ts, views, alpha=sigma)

    def perturb_(self, sigma: float, seed: int) -> None:
        """Set the tensors to ``w0`` perturbed by one draw of noise seeded by ``seed``.

        The same ``seed`` gives the same ``xi`` for every ``sigma`` (common random numbers).
        """
        self.apply_(sigma, self.draw(seed) if sigma != 0.0 else [None] * len(self._groups))

    @torch.no_grad()
    def restore_(self) -> None:
        """Write the saved ``w0`` back (bit for bit)."""
        for _, _, ts, saved, _ in self._groups:
            torch._foreach_copy_(ts, saved)


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Sample mean and standard error ``std(ddof=1) / sqrt(n)`` (NaN error for ``n == 1``)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = math.fsum(values) / n
    if n == 1:
        return m, math.nan
    var = math.fsum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)
