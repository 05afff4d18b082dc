"""Plain per-tensor reference implementations of the updates (ground truth for tests).

Written to mirror the update rules of docs/design.md ("Algorithms") line by line, with no
foreach, no flat buffers and no numerical reformulation (Entropy-SGD keeps ``w'`` and ``mu``
themselves, not offsets). The fast optimizers are tested against these in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__: list[str] = []


def _grad(p: Tensor) -> Tensor:
    """``p.grad``, which the reference updates need (the closure must have set it)."""
    if p.grad is None:
        raise ValueError("reference update on a parameter without a gradient")
    return p.grad


def sgd_update_(
    p: Tensor,
    g: Tensor,
    buf: Tensor | None,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
) -> Tensor | None:
    """One torch-SGD update of one tensor (dampening 0); returns the momentum buffer."""
    d = g + weight_decay * p
    if momentum != 0.0:
        buf = d.clone() if buf is None else momentum * buf + d
        d = d + momentum * buf if nesterov else buf
    p -= lr * d
    return buf


class ReferenceEntropySGD:
    """Literal Entropy-SGD on a list of parameters (one group).

    ``gamma`` is read from the attribute at each outer step (tests change it to emulate a
    schedule). Noise: one ``randn(total)`` per inner step from ``generator``, split in parameter
    order (the fast optimizer's convention for one group on one device and dtype).
    ``outer_update(i, p, G)``, if given, replaces the SGD outer update of tensor ``i`` (``p``
    already holds ``x``), e.g. :class:`ReferenceAdamW`'s ``update_``.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        *,
        lr: float,
        momentum: float,
        nesterov: bool,
        weight_decay: float,
        inner_steps: int,
        inner_lr: float,
        noise: float,
        mu_decay: float,
        gamma: float,
        scale_by_gamma: bool = True,
        inner_weight_decay: float = 0.0,
        seed: int = 0,
        outer_update: Callable[[int, Tensor, Tensor], None] | None = None,
    ) -> None:
        self.outer_update = outer_update
        self.params = list(params)
        self.lr, self.momentum, self.nesterov, self.wd = lr, momentum, nesterov, weight_decay
        self.L, self.eta, self.eps, self.alpha = inner_steps, inner_lr, noise, mu_decay
        self.gamma, self.scale_by_gamma, self.iwd = gamma, scale_by_gamma, inner_weight_decay
        self.generator = torch.Generator().manual_seed(seed)
        self.bufs: list[Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self, closure: Callable[[], object]) -> None:
        ps = self.params
        x = [p.detach().clone() for p in ps]
        mu = [p.detach().clone() for p in ps]
        for _ in range(self.L):
            with torch.enable_grad():
                closure()
            # w' is held in p itself: the closure evaluates the gradient there.
            xi_flat = None
            if self.eps != 0.0:
                total = sum(p.numel() for p in ps)
                xi_flat = torch.randn(total, generator=self.generator, dtype=ps[0].dtype)
            off = 0
            for i, p in enumerate(ps):
                g = _grad(p) + self.gamma * (p - x[i]) + self.iwd * p
                new = p - self.eta * g
                if xi_flat is not None:
                    xi = xi_flat[off : off + p.numel()].view_as(p)
                    new = new + math.sqrt(2.0 * self.eta) * self.eps * xi
                off += p.numel()
                p.copy_(new)
                mu[i] = self.alpha * mu[i] + (1.0 - self.alpha) * p
        for i, p in enumerate(ps):
            big_g = (x[i] - mu[i]) * (self.gamma if self.scale_by_gamma else 1.0)
            p.copy_(x[i])
            if self.outer_update is not None:
                self.outer_update(i, p, big_g)
                continue
            self.bufs[i] = sgd_update_(
                p,
                big_g,
                self.bufs[i],
                lr=self.lr,
                momentum=self.momentum,
                nesterov=self.nesterov,
                weight_decay=self.wd,
            )


class ReferenceAdamW:
    """Literal AdamW (decoupled weight decay, bias-corrected moments) on tensor after tensor.

    ``update_(i, p, g)`` updates tensor ``i``; every tensor's step count advances on its own
    (one call per tensor per optimizer step), as in ``torch.optim.AdamW``.
    """

    def __init__(
        self,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.m: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}
        self.t: dict[int, int] = {}

    @torch.no_grad()
    def update_(self, i: int, p: Tensor, g: Tensor) -> None:
        b1, b2 = self.betas
        t = self.t.get(i, 0) + 1
        m = b1 * self.m.get(i, torch.zeros_like(p)) + (1.0 - b1) * g
        v = b2 * self.v.get(i, torch.zeros_like(p)) + (1.0 - b2) * g * g
        self.t[i], self.m[i], self.v[i] = t, m, v
        m_hat = m / (1.0 - b1**t)
        v_hat = v / (1.0 - b2**t)
        p.mul_(1.0 - self.lr * self.wd)
        p.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


class ReferenceReplicatedSGD:
    """Literal rSGD on ``replica_params[a][i]`` (replica ``a``, tensor ``i``)."""

    def __init__(
        self,
        replica_params: Sequence[Sequence[Tensor]],
        *,
        lr: float,
        momentum: float,
        nesterov: bool,
        weight_decay: float,
        gamma: float,
        coupling_every: int = 1,
    ) -> None:
        self.ps = [list(r) for r in replica_params]
        self.lr, self.momentum, self.nesterov, self.wd = lr, momentum, nesterov, weight_decay
        self.gamma, self.K = gamma, coupling_every
        self.t = 0
        self.bufs: list[list[Tensor | None]] = [[None] * len(r) for r in self.ps]

    @torch.no_grad()
    def step(self) -> None:
        y = len(self.ps)
        couple = self.t % self.K == 0
        grads = [[_grad(p).clone() for p in r] for r in self.ps]
        if couple:
            for i in range(len(self.ps[0])):
                c = sum(self.ps[a][i] for a in range(y)) / y
                for a in range(y):
                    grads[a][i] = grads[a][i] + self.K * self.gamma * (self.ps[a][i] - c)
        for a in range(y):
            for i, p in enumerate(self.ps[a]):
                self.bufs[a][i] = sgd_update_(
                    p,
                    grads[a][i],
                    self.bufs[a][i],
                    lr=self.lr,
                    momentum=self.momentum,
                    nesterov=self.nesterov,
                    weight_decay=self.wd,
                )
        self.t += 1


@torch.no_grad()
def reference_sam_perturbation(
    params: Sequence[Tensor], rho: float, adaptive: bool
) -> list[Tensor]:
    """``e = rho T^2 g / ||T g||`` per tensor, ``T = |w|`` (adaptive) or 1."""
    tg = [(p.abs() if adaptive else torch.ones_like(p)) * _grad(p) for p in params]
    norm = torch.sqrt(torch.stack([(t * t).sum() for t in tg]).sum())
    return [
        rho * (p.abs() ** 2 if adaptive else torch.ones_like(p)) * _grad(p) / (norm + 1e-12)
        for p in params
    ]
