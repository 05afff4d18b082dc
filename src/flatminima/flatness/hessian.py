"""Hessian of the training loss: Hessian-vector products, top eigenvalues, trace.

``H = nabla^2 E(w)`` with ``E`` the mean of ``loss_fn`` over a fixed data set. Products ``H v``
use double backward (Pearlmutter 1994): ``H v = nabla_w (nabla_w E(w) . v)``, one batch at a
time, weighted by batch size. Top eigenvalues: Lanczos with full reorthogonalisation (Lanczos
1950) or shifted block power iteration; trace: Hutchinson's estimator with Rademacher vectors,
``tr H = E_v[v^T H v]`` (Hutchinson 1989; as in PyHessian, Yao et al. 2020).

The model is measured in eval mode (BatchNorm running statistics) and restored afterwards
(modes, ``requires_grad``, parameters, buffers); randomness comes from a private generator.
Vectors are flat: the selected parameters in ``named_parameters()`` order, concatenated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flatminima.flatness.perturb import (
    ParamFilter,
    materialize_batches,
    mean_and_stderr,
    model_device,
    preserve_state,
    select_parameters,
)

logger = logging.getLogger(__name__)

__all__ = [
    "HessianOperator",
    "HessianEigenResult",
    "HessianTraceResult",
    "hvp",
    "hessian_eigenvalues",
    "hessian_trace",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
_VALID_METHODS = ("lanczos", "power")


class HessianOperator:
    """The linear map ``v -> H v`` for a model, loss and fixed data.

    Use inside :func:`~flatminima.flatness.perturb.preserve_state` (it changes no state itself).

    Args:
        model: the network, already in the mode it should be measured in.
        loss_fn: ``loss_fn(output, target) -> scalar`` averaged over the batch.
        batches: materialised ``(x, y)`` batches.
        params: the parameters ``H`` is taken with respect to (they get ``requires_grad``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: list[tuple[Tensor, Tensor]],
        params: Sequence[Tensor],
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.batches = batches
        self.params = list(params)
        self.sizes = [p.numel() for p in self.params]
        self.dim = sum(self.sizes)
        self.n = sum(x.shape[0] for x, _ in batches)
        self.n_products = 0
        p0 = self.params[0]
        self.device, self.dtype = p0.device, p0.dtype

    def _split(self, v: Tensor) -> list[Tensor]:
        return [c.view_as(p) for c, p in zip(v.split(self.sizes), self.params)]

    def __call__(self, v: Tensor) -> Tensor:
        """``H v`` for a flat ``v`` of length ``dim``."""
        vs = self._split(v.to(device=self.device, dtype=self.dtype))
        out = [torch.zeros_like(p) for p in self.params]
        with torch.enable_grad():
            for x, y in self.batches:
                loss = self.loss_fn(self.model(x), y) * (x.shape[0] / self.n)
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                pairs = [(g, vi) for g, vi in zip(grads, vs) if g is not None]
                if not pairs:
                    continue
                dot = sum((g * vi).sum() for g, vi in pairs)
                hv = torch.autograd.grad(dot, self.params, allow_unused=True)
                for acc, h in zip(out, hv):
                    if h is not None:
                        acc += h.detach()
        self.n_products += 1
        return torch.cat([o.reshape(-1) for o in out])


def _setup(
    model: nn.Module, data: object, params: ParamFilter, max_samples: int | None, batch_size: int
) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    chosen = [p for _, p in select_parameters(model, params)]
    batches = materialize_batches(
        data, max_samples=max_samples, batch_size=batch_size, device=model_device(model)
    )
    model.eval()
    for p in chosen:
        p.requires_grad_(True)
    return chosen, batches


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    data: object,
    vec: Tensor | Sequence[Tensor],
    params: ParamFilter = None,
    *,
    max_samples: int | None = None,
    batch_size: int = 256,
) -> Tensor | list[Tensor]:
    """Hessian-vector product ``H v`` of the mean loss over ``data``.

    Args:
        model: the network (evaluated in eval mode, restored afterwards).
        loss_fn: ``loss_fn(output, target) -> scalar`` averaged over the batch.
        data: ``(inputs, targets)`` tensors or an iterable of ``(x, y)`` batches.
        vec: a flat tensor over the selected parameters, or a list of tensors shaped like them.
        params: parameter filter (names or predicate ``(name, p) -> bool``).
        max_samples, batch_size: data subset and batch size for tensor data.

    Returns:
        ``H v`` in the same form as ``vec``.

    Raises:
        ValueError: ``vec`` does not match the selected parameters, empty data, bad filter.
    """
    with preserve_state(model):
        chosen, batches = _setup(model, data, params, max_samples, batch_size)
        op = HessianOperator(model, loss_fn, batches, chosen)
        if isinstance(vec, Tensor):
            if vec.numel() != op.dim:
                raise ValueError(
                    f"vec has {vec.numel()} entries; the selected parameters have {op.dim}"
                )
            return op(vec.reshape(-1)).to(vec.dtype).reshape(vec.shape)
        vecs = list(vec)
        if len(vecs) != len(chosen) or any(v.shape != p.shape for v, p in zip(vecs, chosen)):
            raise ValueError(
                "vec as a list must match the selected parameters' shapes "
                f"{[tuple(p.shape) for p in chosen]}, got {[tuple(v.shape) for v in vecs]}"
            )
        flat = op(torch.cat([v.reshape(-1) for v in vecs]))
        return op._split(flat)


@dataclass
class HessianEigenResult:
    """Top eigenvalues (largest algebraic first) and how they were found.

    Attributes:
        eigenvalues: the ``k`` largest eigenvalues, descending.
        eigenvectors: ``[k, D]`` unit eigenvector estimates (flat over the selected params).
        method: ``"lanczos"`` or ``"power"``.
        n_iter: iterations run; ``n_hvp``: Hessian-vector products used.
        converged: whether the tolerance was met within ``max_iter``.
    """

    eigenvalues: list[float]
    eigenvectors: Tensor
    method: str
    n_iter: int
    n_hvp: int
    converged: bool

    def to_dict(self) -> dict[str, Any]:
        """Fields without the eigenvectors, as plain Python objects."""
        d = asdict(self)
        d.pop("eigenvectors")
        return d


def _lanczos(
    op: Callable[[Tensor], Tensor],
    dim: int,
    k: int,
    max_iter: int,
    tol: float,
    gen: torch.Generator,
    device: torch.device,
) -> tuple[Tensor, Tensor, int, bool]:
    """Lanczos with full reorthogonalisation in float64; Ritz values/vectors of the top k."""
    m_max = min(max_iter, dim)
    q = torch.randn(dim, generator=gen, device=device, dtype=torch.float64)
    q /= q.norm()
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    converged = False
    prev: Tensor | None = None
    theta = s = None
    for j in range(m_max):
        w = op(basis[j]).double()
        a = float(w @ basis[j])
        alphas.append(a)
        Q = torch.stack(basis)
        w = w - Q.T @ (Q @ w)
        w = w - Q.T @ (Q @ w)  # twice is enough (Kahan-Parlett)
        b = float(w.norm())
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(T)
        kk = min(k, j + 1)
        top = theta[-kk:]
        # residual of Ritz pair i is |b * s[last, i]|
        resid = (b * s[-1, -kk:]).abs()
        scale = top.abs().clamp(min=1e-12)
        if kk == k and bool((resid <= tol * scale).all()):
            converged = True
            break
        if (
            prev is not None
            and kk == k
            and bool(((top - prev).abs() <= tol * scale).all())
            and bool((resid <= math.sqrt(tol) * scale).all())
        ):
            converged = True
            break
        prev = top.clone() if kk == k else None
        if b <= 1e-12 * max(1.0, abs(a)) or j + 1 == m_max:
            converged = j + 1 == dim or b <= 1e-12 * max(1.0, abs(a))
            break
        basis.append(w / b)
        betas.append(b)
    assert theta is not None and s is not None
    Q = torch.stack(basis[: len(alphas)])
    kk = min(k, theta.numel())
    vals = theta[-kk:].flip(0)
    vecs = s[:, -kk:].flip(1).T.to(Q.device) @ Q  # T (and s) are small, on the CPU
    return vals, vecs, len(alphas), converged


def _power(
    op: Callable[[Tensor], Tensor],
    dim: int,
    k: int,
    max_iter: int,
    tol: float,
    gen: torch.Generator,
    device: torch.device,
) -> tuple[Tensor, Tensor, int, bool]:
    """Shifted orthogonal (block power) iteration with Rayleigh-Ritz, in float64.

    Plain power iteration finds the eigenvalue of largest *magnitude* ``mu``. If ``k == 1`` and
    ``mu > 0`` that is the largest algebraic one; otherwise iterate on ``H + |mu| I`` (all
    eigenvalues >= 0, same order as ``H``) so the block converges to the top-k algebraic.
    """

    def block(shift: float, kb: int, iters: int) -> tuple[Tensor, Tensor, int, bool]:
        V = torch.linalg.qr(
            torch.randn(dim, kb, generator=gen, device=device, dtype=torch.float64)
        )[0]
        prev = None
        for it in range(1, iters + 1):
            HV = torch.stack([op(V[:, i]).double() for i in range(kb)], 1)
            R = V.T @ HV  # Rayleigh-Ritz
            theta, S = torch.linalg.eigh((R + R.T) / 2)
            V = torch.linalg.qr(HV + shift * V)[0]
            if prev is not None and bool(
                ((theta - prev).abs() <= tol * theta.abs().clamp(min=1e-12)).all()
            ):
                ritz = V.T @ torch.stack([op(V[:, i]).double() for i in range(kb)], 1)
                theta, S = torch.linalg.eigh((ritz + ritz.T) / 2)
                return theta.flip(0), (V @ S).T.flip(0), it, True
            prev = theta
        return theta.flip(0), (V @ S).T.flip(0), iters, False

    kb = min(k, dim)
    vals, vecs, it1, ok = block(0.0, 1, max_iter)
    mu = float(vals[0])
    if kb == 1 and mu >= 0:
        return vals, vecs, it1, ok
    vals, vecs, it2, ok = block(abs(mu) * 1.01 + 1e-12, kb, max_iter)
    return vals, vecs, it1 + it2, ok


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: object,
    k: int = 1,
    method: str = "lanczos",
    max_iter: int = 100,
    tol: float = 1e-6,
    params: ParamFilter = None,
    seed: int = 0,
    *,
    max_samples: int | None = None,
    batch_size: int = 256,
) -> HessianEigenResult:
    """The ``k`` largest (algebraic) eigenvalues of the loss Hessian.

    Args:
        model: the network (evaluated in eval mode, restored afterwards).
        loss_fn: ``loss_fn(output, target) -> scalar`` averaged over the batch.
        data: ``(inputs, targets)`` tensors or an iterable of ``(x, y)`` batches.
        k: number of eigenvalues (``1 <= k <= D``).
        method: ``"lanczos"`` (Krylov, ``max_iter`` products at most) or ``"power"``
            (block power iteration, ``k`` products per iteration).
        max_iter: iteration cap (Lanczos steps or power iterations).
        tol: relative tolerance on the Ritz residual / eigenvalue change.
        params: parameter filter (names or predicate ``(name, p) -> bool``).
        seed: seed of the starting vector's private generator.
        max_samples, batch_size: data subset and batch size for tensor data.

    Raises:
        ValueError: bad ``k``, ``method``, ``max_iter`` or ``tol``; empty data; bad filter.
    """
    if method not in _VALID_METHODS:
        raise ValueError(f"method must be one of {_VALID_METHODS}, got {method!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    with preserve_state(model):
        chosen, batches = _setup(model, data, params, max_samples, batch_size)
        op = HessianOperator(model, loss_fn, batches, chosen)
        if k > op.dim:
            raise ValueError(f"k={k} exceeds the number of selected parameters {op.dim}")
        gen = torch.Generator(device=op.device)
        gen.manual_seed(seed)
        fn = _lanczos if method == "lanczos" else _power
        vals, vecs, n_iter, ok = fn(op, op.dim, k, max_iter, tol, gen, op.device)
        if not ok:
            logger.warning(
                "hessian_eigenvalues(%s) did not reach tol=%g in %d iterations", method, tol, n_iter
            )
        return HessianEigenResult(
            eigenvalues=vals.tolist(),
            eigenvectors=vecs.to(op.dtype),
            method=method,
            n_iter=n_iter,
            n_hvp=op.n_products,
            converged=ok,
        )


@dataclass
class HessianTraceResult:
    """Hutchinson estimate of ``tr H`` with its standard error over probe vectors."""

    estimate: float
    stderr: float
    n_samples: int

    def to_dict(self) -> dict[str, Any]:
        """Fields as plain Python objects."""
        return asdict(self)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: object,
    n_samples: int = 100,
    params: ParamFilter = None,
    seed: int = 0,
    *,
    max_samples: int | None = None,
    batch_size: int = 256,
) -> HessianTraceResult:
    """Hutchinson trace ``tr H ≈ (1/n) sum_s v_s^T H v_s``, ``v_s`` Rademacher (+-1 entries).

    The standard error is ``std_s(v_s^T H v_s) / sqrt(n)``; the estimator's variance is
    ``2 sum_{i != j} H_ij^2`` per probe (zero for diagonal ``H``).

    Raises:
        ValueError: ``n_samples < 1``, empty data, bad filter.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    with preserve_state(model):
        chosen, batches = _setup(model, data, params, max_samples, batch_size)
        op = HessianOperator(model, loss_fn, batches, chosen)
        gen = torch.Generator(device=op.device)
        gen.manual_seed(seed)
        vals = []
        for _ in range(n_samples):
            v = torch.randint(0, 2, (op.dim,), generator=gen, device=op.device)
            v = (2 * v - 1).to(op.dtype)
            vals.append(float((v.double() * op(v).double()).sum()))
        est, se = mean_and_stderr(vals)
        return HessianTraceResult(estimate=est, stderr=se, n_samples=n_samples)
