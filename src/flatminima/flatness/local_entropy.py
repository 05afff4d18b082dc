"""Local free entropy by thermodynamic integration with Langevin sampling.

Definition (Pittorino et al., ICLR 2021, arXiv:2006.07897; Baldassi et al., PNAS 2016,
"Unreasonable effectiveness of learning neural networks"; Chaudhari et al., ICLR 2017):

    Phi(w; gamma, beta) = log E_{w' ~ N(w, I / (beta gamma))} exp(-beta (E(w') - E(w)))  (<= 0 at
    a minimum; closer to 0 = flatter).

Estimator. Let ``dE(w') = E(w') - E(w)`` and, for ``t in [0, 1]``, the tilted measure

    p_t(w') ∝ N(w'; w, I / (beta gamma)) exp(-t beta dE(w')),   Z(t) = E_{N} exp(-t beta dE).

Then ``Z(0) = 1`` and ``d log Z / dt = -beta <dE>_t``, so (thermodynamic integration)

    Phi = log Z(1) = -beta ∫_0^1 <dE>_t dt.

The integral is a Gauss-Legendre rule in ``u`` with ``t = u ** t_power`` (``dt = t_power
u^(t_power-1) du``); ``t_power = 2`` clusters nodes near ``t = 0`` where ``<dE>_t`` changes
fastest when the curvature of ``E`` exceeds ``gamma``. Each ``<dE>_t`` is a time average of
Langevin chains targeting ``p_t``, with

    log p_t(x) = -(beta gamma / 2) ||x - w||^2 - t beta dE(x),
    x <- x + h grad log p_t(x) + sqrt(2 h) xi                           (ULA proposal)

and, for ``method="mala"``, a Metropolis-Hastings accept/reject that removes the step-size bias.
Chains start from exact draws of ``p_0 = N(w, I/(beta gamma))`` and walk the nodes in increasing
``t``, each node starting from the previous node's state (annealing).

Controls. Bias: quadrature (``n_t``, ``t_power``; exact for polynomial integrands of degree
``< 2 n_t``), burn-in per node (``burn_in``), and for ULA the step size (stationary bias
``O(h)``: for a Gaussian of precision ``a`` the variance is inflated by ``1 / (1 - h a / 2)``).
MALA is unbiased for any step size; its step is adapted during burn-in towards
``target_accept`` and frozen afterwards. Variance: ``n_chains`` independent chains give the
standard error ``std_c(Phi_c) / sqrt(n_chains)``, and ``n_steps`` samples per node reduce each
chain's variance. Cost: ``n_t * (burn_in + n_steps) * n_chains`` energy+gradient evaluations.

For a quadratic ``E(x) = 1/2 (x - w0)^T H (x - w0)`` with eigenvalues ``lambda_i`` and
``g = H (w - w0)``, every ``p_t`` is Gaussian and

    Phi = -1/2 sum_i log(1 + lambda_i / gamma) + (beta / 2) g^T (gamma I + H)^{-1} g,

which at the minimum (``w = w0``) does not depend on ``beta``: :func:`quadratic_local_free_entropy`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatminima.flatness.perturb import (
    ParamFilter,
    materialize_batches,
    mean_and_stderr,
    model_device,
    preserve_global_rng,
    preserve_state,
    select_parameters,
)

logger = logging.getLogger(__name__)

__all__ = [
    "LocalFreeEntropyResult",
    "local_free_entropy",
    "local_free_entropy_fn",
    "quadratic_local_free_entropy",
    "tilted_quadrature",
]

_VALID_METHODS = ("mala", "ula")

#: ``energy_and_grad(X)`` for a batch of chain states ``X`` of shape ``[C, D]`` returns the
#: energies ``[C]`` and gradients ``[C, D]`` (both detached).
EnergyGrad = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass
class LocalFreeEntropyResult:
    """Estimate of ``Phi(w; gamma, beta)`` with diagnostics.

    Attributes:
        estimate: the thermodynamic-integration estimate of ``Phi``.
        stderr: standard error over the independent chains.
        gamma, beta: the parameters of ``Phi``.
        base_energy: ``E(w)``.
        t_nodes, t_weights: the quadrature nodes in ``t`` and their weights (``sum = 1``).
        mean_delta_energy: ``<E(w') - E(w)>_t`` at each node (mean over chains).
        mean_delta_energy_se: its standard error over chains.
        acceptance: mean MALA acceptance rate after burn-in at each node (NaN for ULA).
        step_sizes: mean step size used after burn-in at each node.
        chain_estimates: ``Phi`` estimated by each chain.
        method, n_chains, n_steps, burn_in: the sampler settings.
    """

    estimate: float
    stderr: float
    gamma: float
    beta: float
    base_energy: float
    t_nodes: list[float]
    t_weights: list[float]
    mean_delta_energy: list[float]
    mean_delta_energy_se: list[float]
    acceptance: list[float]
    step_sizes: list[float]
    chain_estimates: list[float] = field(repr=False)
    method: str = "mala"
    n_chains: int = 0
    n_steps: int = 0
    burn_in: int = 0

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain Python objects (JSON-serialisable)."""
        return asdict(self)


def quadratic_local_free_entropy(
    hessian: Tensor, gamma: float, beta: float = 1.0, offset: Tensor | None = None
) -> float:
    """Closed-form ``Phi`` for ``E(x) = 1/2 (x - w0)^T H (x - w0)`` measured at ``w = w0 + offset``.

    ``Phi = -1/2 log det(I + H / gamma) + (beta / 2) g^T (gamma I + H)^{-1} g`` with
    ``g = H offset`` (``offset=None``: at the minimum, where ``beta`` drops out). Requires
    ``gamma I + H`` positive definite.
    """
    h = hessian.double()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    _, logdet = torch.linalg.slogdet(eye + h / gamma)
    phi = -0.5 * logdet.item()
    if offset is not None:
        g = h @ offset.double()
        phi += 0.5 * beta * (g @ torch.linalg.solve(gamma * eye + h, g)).item()
    return phi


def tilted_quadrature(n_t: int, t_power: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``t_j`` in (0, 1) and weights ``c_j`` with ``∫_0^1 f(t) dt ≈ sum_j c_j f(t_j)``.

    Gauss-Legendre in ``u`` on [0, 1] with ``t = u ** t_power``.

    Raises:
        ValueError: ``n_t < 1`` or ``t_power < 1``.
    """
    if n_t < 1:
        raise ValueError(f"n_t must be >= 1, got {n_t}")
    if not t_power >= 1.0:
        raise ValueError(f"t_power must be >= 1, got {t_power}")
    x, w = np.polynomial.legendre.leggauss(n_t)
    u = (x + 1.0) / 2.0
    wu = w / 2.0
    return u**t_power, wu * t_power * u ** (t_power - 1.0)


def _check_common(
    gamma: float,
    beta: float,
    n_chains: int,
    n_steps: int,
    burn_in: int,
    method: str,
    step_size: float | None,
    target_accept: float,
) -> None:
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be finite and > 0, got {gamma}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be finite and > 0, got {beta}")
    if n_chains < 2:
        raise ValueError(f"n_chains must be >= 2 (for a standard error), got {n_chains}")
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if burn_in < 0:
        raise ValueError(f"burn_in must be >= 0, got {burn_in}")
    if method not in _VALID_METHODS:
        raise ValueError(f"method must be one of {_VALID_METHODS}, got {method!r}")
    if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be > 0 or None, got {step_size}")
    if not 0.0 < target_accept < 1.0:
        raise ValueError(f"target_accept must be in (0, 1), got {target_accept}")


@dataclass
class _Chains:
    """State of ``n_chains`` Langevin chains on flat ``[n_chains, D]`` states.

    ``x`` the positions, ``de`` their energies above the base energy (float64), ``g`` the
    energy gradients, ``log_h`` the per-chain log step sizes (adapted during burn-in).
    """

    x: Tensor
    de: Tensor
    g: Tensor
    log_h: Tensor


@dataclass
class _Target:
    """The tilted measure ``p_t(x) ~ N(x; w, I/prec) exp(-t beta (E(x) - E(w)))``."""

    energy_and_grad: EnergyGrad
    w: Tensor
    prec: float
    beta: float
    base_energy: float
    gen: torch.Generator

    def delta_energy(self, x: Tensor) -> tuple[Tensor, Tensor]:
        e, g = self.energy_and_grad(x)
        return e.double() - self.base_energy, g

    def logp_grad(self, x: Tensor, de: Tensor, g: Tensor, t: float) -> tuple[Tensor, Tensor]:
        diff = x - self.w
        logp = -0.5 * self.prec * (diff.double() ** 2).sum(1) - t * self.beta * de
        return logp, -self.prec * diff - (t * self.beta) * g


def _sample_node(
    target: _Target,
    ch: _Chains,
    t: float,
    *,
    mala: bool,
    adapt: bool,
    target_accept: float,
    burn_in: int,
    n_steps: int,
) -> tuple[Tensor, Tensor]:
    """Run the chains at temperature node ``t``; return the per-chain sums of ``dE`` and of the
    acceptance probability over the ``n_steps`` steps after ``burn_in``."""
    n_chains, dim = ch.x.shape
    dev, dtype = ch.x.device, ch.x.dtype
    logp, glp = target.logp_grad(ch.x, ch.de, ch.g, t)
    sum_de = torch.zeros(n_chains, dtype=torch.float64, device=dev)
    sum_acc = torch.zeros(n_chains, dtype=torch.float64, device=dev)
    for k in range(burn_in + n_steps):
        h = ch.log_h.exp()
        hd = h.to(dtype)
        mean_fwd = ch.x + hd * glp
        noise = torch.randn(n_chains, dim, generator=target.gen, device=dev, dtype=dtype)
        y = mean_fwd + (2.0 * hd).sqrt() * noise
        de_y, g_y = target.delta_energy(y)
        if mala:
            logp_y, glp_y = target.logp_grad(y, de_y, g_y, t)
            mean_bwd = y + hd * glp_y
            log_q_fwd = -((y - mean_fwd).double() ** 2).sum(1) / (4.0 * h[:, 0])
            log_q_bwd = -((ch.x - mean_bwd).double() ** 2).sum(1) / (4.0 * h[:, 0])
            log_ratio = torch.nan_to_num(logp_y - logp + log_q_bwd - log_q_fwd, nan=-math.inf)
            prob = log_ratio.clamp(max=0.0).exp()
            u = torch.rand(n_chains, generator=target.gen, device=dev, dtype=torch.float64)
            acc = u < prob
            a = acc.unsqueeze(1)
            ch.x = torch.where(a, y, ch.x)
            ch.g = torch.where(a, g_y, ch.g)
            glp = torch.where(a, glp_y, glp)
            ch.de = torch.where(acc, de_y, ch.de)
            logp = torch.where(acc, logp_y, logp)
            if adapt and k < burn_in:
                # Robbins-Monro on log h towards the target acceptance (burn-in only)
                ch.log_h += (prob.unsqueeze(1) - target_accept) * (1.0 / math.sqrt(1.0 + k))
        else:
            ch.x, ch.g, ch.de = y, g_y, de_y
            prob = torch.full((n_chains,), math.nan, dtype=torch.float64, device=dev)
            logp, glp = target.logp_grad(ch.x, ch.de, ch.g, t)
        if k >= burn_in:
            sum_de += ch.de
            sum_acc += prob
    return sum_de, sum_acc


@torch.no_grad()
def _integrate(
    energy_and_grad: EnergyGrad,
    w0: Tensor,
    gamma: float,
    beta: float,
    *,
    n_t: int,
    t_power: float,
    n_chains: int,
    n_steps: int,
    burn_in: int,
    step_size: float | None,
    method: str,
    adapt: bool,
    target_accept: float,
    seed: int,
) -> LocalFreeEntropyResult:
    """Thermodynamic integration core on flat states (see the module docstring)."""
    dim = w0.numel()
    w = w0.detach().reshape(1, dim)
    dev, dtype = w.device, w.dtype
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    prec = beta * gamma  # precision of the Gaussian factor
    e0, _ = energy_and_grad(w)
    base_energy = float(e0.reshape(-1)[0])
    if not math.isfinite(base_energy):
        raise ValueError(f"energy at w is not finite: {base_energy}")
    target = _Target(energy_and_grad, w, prec, beta, base_energy, gen)
    nodes, weights = tilted_quadrature(n_t, t_power)
    mala = method == "mala"
    if step_size is None:
        # MALA: a D^{-1/3} fraction of the prior variance, then adapted; ULA: small (bias O(h)).
        step_size = (1.0 / prec) * (dim ** (-1.0 / 3.0) if mala else 0.05)
    log_h = torch.full((n_chains, 1), math.log(step_size), device=dev, dtype=torch.float64)
    # exact draws from p_0 = N(w, I / (beta gamma))
    x = w + torch.randn(n_chains, dim, generator=gen, device=dev, dtype=dtype) / math.sqrt(prec)
    de, g = target.delta_energy(x)
    chains = _Chains(x, de, g, log_h)

    chain_means = torch.zeros(n_chains, n_t, dtype=torch.float64, device=dev)
    acc_rates: list[float] = []
    used_h: list[float] = []
    for j, t in enumerate(nodes.tolist()):
        sum_de, sum_acc = _sample_node(
            target,
            chains,
            t,
            mala=mala,
            adapt=adapt,
            target_accept=target_accept,
            burn_in=burn_in,
            n_steps=n_steps,
        )
        if not torch.isfinite(sum_de).all():
            raise FloatingPointError(
                f"non-finite energy at t={t:.4g}: lower step_size (now {step_size:g}) or "
                "use method='mala'"
            )
        chain_means[:, j] = sum_de / n_steps
        acc_rates.append(float(sum_acc.mean() / n_steps))
        used_h.append(float(chains.log_h.exp().mean()))
        logger.debug("t=%.4f <dE>=%.6g acc=%.3f", t, float(chain_means[:, j].mean()), acc_rates[-1])

    wts = torch.as_tensor(weights, dtype=torch.float64, device=dev)
    per_chain = (-beta * (chain_means * wts).sum(1)).tolist()
    est, se = mean_and_stderr(per_chain)
    node_stats = [mean_and_stderr(chain_means[:, j].tolist()) for j in range(n_t)]
    return LocalFreeEntropyResult(
        estimate=est,
        stderr=se,
        gamma=float(gamma),
        beta=float(beta),
        base_energy=base_energy,
        t_nodes=nodes.tolist(),
        t_weights=weights.tolist(),
        mean_delta_energy=[m for m, _ in node_stats],
        mean_delta_energy_se=[s for _, s in node_stats],
        acceptance=acc_rates,
        step_sizes=used_h,
        chain_estimates=per_chain,
        method=method,
        n_chains=n_chains,
        n_steps=n_steps,
        burn_in=burn_in,
    )


def local_free_entropy_fn(
    energy_fn: Callable[[Tensor], Tensor],
    w0: Tensor,
    gamma: float,
    beta: float,
    *,
    n_t: int = 16,
    t_power: float = 2.0,
    n_chains: int = 8,
    n_steps: int = 200,
    burn_in: int = 100,
    step_size: float | None = None,
    method: str = "mala",
    adapt: bool = True,
    target_accept: float = 0.574,
    vectorized: bool = False,
    seed: int = 0,
) -> LocalFreeEntropyResult:
    """``Phi(w0; gamma, beta)`` for a differentiable energy ``E(w_flat) -> scalar``.

    Args:
        energy_fn: ``E``; with ``vectorized=True`` it maps ``[C, D] -> [C]`` (one energy per row).
        w0: the point ``w`` (any shape; flattened to ``D`` entries).
        gamma: coupling ``gamma > 0`` (the Gaussian has variance ``1 / (beta gamma)``).
        beta: inverse temperature ``beta > 0``.
        n_t: quadrature nodes in ``t``.
        t_power: ``t = u ** t_power`` (``>= 1``; 2 suits stiff energies).
        n_chains: independent chains (``>= 2``), for the standard error.
        n_steps: samples per node per chain after burn-in.
        burn_in: discarded steps per node (step size adapted here for MALA).
        step_size: initial Langevin step ``h`` (default ``D^{-1/3} / (beta gamma)`` for MALA,
            ``0.05 / (beta gamma)`` for ULA).
        method: ``"mala"`` (Metropolis-adjusted, unbiased) or ``"ula"`` (unadjusted, bias O(h)).
        adapt: adapt the MALA step size during burn-in.
        target_accept: MALA target acceptance (0.574 is optimal for smooth targets).
        vectorized: ``energy_fn`` accepts a batch of states.
        seed: seed of the private generator (the global RNG is never touched).

    Returns:
        A :class:`LocalFreeEntropyResult`.

    Raises:
        ValueError: ``gamma <= 0``, ``beta <= 0``, bad sampler settings, empty ``w0``, or a
            non-finite energy at ``w0``.

    Example:
        >>> H = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
        >>> r = local_free_entropy_fn(lambda x: 0.5 * x @ H @ x, torch.zeros(2, dtype=H.dtype),
        ...                           gamma=1.0, beta=1.0, n_steps=50, burn_in=20)
        >>> abs(r.estimate - quadratic_local_free_entropy(H, 1.0)) < 5 * r.stderr + 0.05
        True
    """
    _check_common(gamma, beta, n_chains, n_steps, burn_in, method, step_size, target_accept)
    if w0.numel() == 0:
        raise ValueError("w0 is empty: nothing to measure")
    shape = w0.shape
    if not w0.is_floating_point():
        raise ValueError(f"w0 must be a floating-point tensor, got dtype {w0.dtype}")

    def energy_and_grad(xs: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            xs = xs.detach().requires_grad_(True)
            if vectorized:
                e = energy_fn(xs.reshape(xs.shape[0], *shape) if len(shape) != 1 else xs)
                e = e.reshape(-1)
            else:
                e = torch.stack([energy_fn(xi.reshape(shape)).reshape(()) for xi in xs])
            (g,) = torch.autograd.grad(e.sum(), xs)
        return e.detach(), g.detach()

    with preserve_global_rng([w0.device]):
        return _integrate(
            energy_and_grad,
            w0.detach().reshape(-1),
            gamma,
            beta,
            n_t=n_t,
            t_power=t_power,
            n_chains=n_chains,
            n_steps=n_steps,
            burn_in=burn_in,
            step_size=step_size,
            method=method,
            adapt=adapt,
            target_accept=target_accept,
            seed=seed,
        )


def local_free_entropy(
    model: nn.Module,
    data: object,
    gamma: float,
    beta: float,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    params: ParamFilter = None,
    max_samples: int | None = None,
    batch_size: int = 256,
    n_t: int = 16,
    t_power: float = 2.0,
    n_chains: int = 4,
    n_steps: int = 100,
    burn_in: int = 50,
    step_size: float | None = None,
    method: str = "mala",
    adapt: bool = True,
    target_accept: float = 0.574,
    seed: int = 0,
) -> LocalFreeEntropyResult:
    """``Phi(w; gamma, beta)`` of a network at its current weights, ``E`` = full-batch mean loss.

    ``E(w')`` is the mean of ``loss_fn`` over the data (or its first ``max_samples`` samples),
    the same fixed set at every step, so the sampled measure is well defined. The model is in
    eval mode (BatchNorm uses running statistics) and is returned bit for bit as it was; the
    global RNG is untouched. Only the selected parameters move; the others stay at ``w``.
    Since ``E`` is a *mean* loss, ``beta`` is per sample: ``beta = P`` with ``P`` samples
    corresponds to the summed loss at unit inverse temperature.

    Args:
        model: the network.
        data: ``(inputs, targets)`` tensors or an iterable of ``(x, y)`` batches.
        gamma, beta: see :func:`local_free_entropy_fn`.
        loss_fn: ``loss_fn(output, target) -> scalar`` averaged over the batch.
        params: parameter filter (names or predicate ``(name, p) -> bool``).
        max_samples, batch_size: data subset and evaluation batch size.
        n_t, t_power, n_chains, n_steps, burn_in, step_size, method, adapt, target_accept,
            seed: sampler settings, see :func:`local_free_entropy_fn`.

    Raises:
        ValueError: as :func:`local_free_entropy_fn`, plus empty data or no parameters.
    """
    _check_common(gamma, beta, n_chains, n_steps, burn_in, method, step_size, target_accept)
    chosen = [p for _, p in select_parameters(model, params)]
    dev = model_device(model)
    with preserve_state(model) as _:
        batches = materialize_batches(
            data, max_samples=max_samples, batch_size=batch_size, device=dev
        )
        n = sum(x.shape[0] for x, _ in batches)
        model.eval()
        for p in chosen:
            p.requires_grad_(True)
        sizes = [p.numel() for p in chosen]
        w0 = torch.cat([p.detach().reshape(-1) for p in chosen])

        def energy_and_grad(xs: Tensor) -> tuple[Tensor, Tensor]:
            es, gs = [], []
            for xi in xs:
                with torch.no_grad():
                    torch._foreach_copy_(
                        chosen, [c.view_as(p) for c, p in zip(xi.split(sizes), chosen)]
                    )
                e_sum = torch.zeros((), dtype=torch.float64, device=dev)
                g_sum = [torch.zeros_like(p) for p in chosen]
                with torch.enable_grad():
                    for bx, by in batches:
                        loss = loss_fn(model(bx), by) * (bx.shape[0] / n)
                        grads = torch.autograd.grad(loss, chosen, allow_unused=True)
                        e_sum += loss.detach().double()
                        for acc, gr in zip(g_sum, grads):
                            if gr is not None:
                                acc += gr
                es.append(e_sum.to(w0.dtype))
                gs.append(torch.cat([gi.reshape(-1) for gi in g_sum]))
            return torch.stack(es), torch.stack(gs)

        return _integrate(
            energy_and_grad,
            w0,
            gamma,
            beta,
            n_t=n_t,
            t_power=t_power,
            n_chains=n_chains,
            n_steps=n_steps,
            burn_in=burn_in,
            step_size=step_size,
            method=method,
            adapt=adapt,
            target_accept=target_accept,
            seed=seed,
        )
