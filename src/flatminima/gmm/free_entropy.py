"""Local free entropy of a linear classifier with the error-counting energy.

For the classifier ``sign(w . x / sqrt(N) + b)`` on its training set ``(X [P, N], y [P])`` the
energy is the NUMBER of training errors,

    E(w) = sum_mu Theta(-y_mu h_mu),    h_mu = w . x_mu / sqrt(N) + b,

with ``Theta(0) = 1`` (a sample on the boundary counts as an error, as in
:func:`flatminima.gmm.flatness.training_error`), and the local free entropy is (docs/design.md,
"Flatness measures"; Pittorino et al., ICLR 2021, arXiv:2006.07897; Baldassi et al., PNAS 2016)

    Phi(w; gamma, beta) = log E_{w' ~ N(w, I_N / (beta gamma))} exp(-beta (E(w') - E(w))).

Only ``w`` is perturbed; ``b`` is fixed. Closer to 0 = flatter. ``Phi <= 0`` is guaranteed only
when ``E(w) = 0``; a ``w`` with errors that noise can remove may have ``Phi > 0``.

Normalisation. The classifier is invariant under ``(w, b) -> (c w, c b)``, ``c > 0``, but the
perturbation is not, so by default ``(w, b)`` is first rescaled to ``||w||^2 = N`` (``q = 1``):
``gamma`` and ``beta`` then mean the same for every estimator. Each weight is perturbed by
``sigma = 1 / sqrt(beta gamma)`` against a typical ``|w_i| ~ 1``; a field ``h_mu`` moves by
``sigma ||x_mu|| / sqrt(N)``, i.e. ``sigma sqrt(Delta)`` on the Gaussian mixture.

Estimator: thermodynamic integration (TI). With ``dE(w') = E(w') - E(w)`` and the tilted measure

    p_t(w') ∝ N(w'; w, I / (beta gamma)) exp(-t dE(w')),    t in [0, beta]

(the prior variance stays ``1 / (beta gamma)`` while ``t`` runs), ``Z(t) = E_prior exp(-t dE)``
has ``Z(0) = 1`` and ``d log Z / dt = -<dE>_t``, so

    Phi = log Z(beta) = -int_0^beta <dE>_t dt.

The integral is a Gauss-Legendre rule in ``u`` with ``t = beta u^t_power`` (nodes denser near
``t = 0``, where ``<dE>_t`` falls fastest). ``E`` is piecewise constant, so gradient samplers
do not apply; ``p_t`` is sampled by elliptical slice sampling (ESS; Murray, Adams, MacKay,
AISTATS 2010), exact for a Gaussian prior times any likelihood, here ``L_t = exp(-t dE)``.

Field space. ``E`` depends on the perturbation ``delta = w' - w`` only through the margin shifts
``g = Ay delta`` with ``Ay = diag(y) X / sqrt(N)``. An ESS proposal
``delta' = delta cos th + nu sin th`` (``nu`` a fresh prior draw) has
``g' = g cos th + g_nu sin th`` with ``g_nu = Ay nu``: one GEMM per step for ``n_chains``
chains at once (``nu`` is ``[N, C]``), and ``O(P C)`` work per shrink of the angle bracket.

Blocks. With ``block_size = B < N`` each step is an ESS update of one block of ``B`` coordinates
of ``delta`` (the isotropic prior factorises, so this is an exact Gibbs-within-ESS move; blocks
are cycled in a fixed random order). A block move shifts the margins by ``~sqrt(B / N)`` of a
full move, so the accepted angle is larger where ``t`` is large, at ``2 B / N`` of the GEMM
cost (the block's own ``Ay_B delta_B`` is needed too). ``block_size=None`` uses full moves.

Error bar: each chain gives its own TI estimate ``Phi_c``; ``phi`` is their mean and ``phi_se``
their standard error. This covers the sampling noise, not a bias from chains that lag behind
``p_t`` (check by increasing ``n_steps`` / ``burn_in``).

Cost: ``n_temps * (burn_in + n_steps)`` ESS steps of ``n_chains`` chains, each one
``[P, B] x [B, C]`` GEMM (two for blocks) plus a few ``[P, C]`` passes per shrink.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from flatminima.gmm.theory import H

__all__ = [
    "DEFAULT_BETA",
    "DEFAULT_GAMMA",
    "FreeEntropyResult",
    "error_count",
    "local_free_entropy",
    "prior_delta_energy",
]

log = logging.getLogger(__name__)

#: Inverse temperature per training error. See :func:`local_free_entropy` for the choice.
DEFAULT_BETA = 0.25
#: Coupling; with ``DEFAULT_BETA`` the perturbation std per weight is ``1/sqrt(16 * 0.25) = 0.5``.
DEFAULT_GAMMA = 16.0

_MAX_SHRINKS = 60  # bracket shrunk by ~2x per try: below 2 pi 2^-60 the chain simply stays


@dataclass(frozen=True)
class FreeEntropyResult:
    """Estimate of ``Phi(w; gamma, beta)`` with diagnostics.

    Attributes:
        phi: TI estimate of ``Phi`` (mean over chains).
        phi_se: standard error of ``phi`` over the independent chains.
        gamma, beta: the parameters of ``Phi``.
        scale: the factor ``c`` applied to ``(w, b)`` (``sqrt(N) / ||w||``; 1 if not normalised).
        base_energy: ``E(w)``, the number of training errors at the centre.
        prior_delta_energy: ``<dE>_0`` under the prior, exact (see :func:`prior_delta_energy`).
        temps: the TI nodes ``t_j`` in ``(0, beta)``.
        weights: their quadrature weights (``sum = beta``).
        mean_delta_energy: ``<E(w') - E(w)>_t`` at each node (mean over chains).
        mean_delta_energy_se: its standard error over chains.
        mean_shrinks: mean number of rejected ESS proposals per step at each node.
        chain_phi: the estimate of each chain.
        n_chains, n_steps, burn_in, block_size: the sampler settings.
    """

    phi: float
    phi_se: float
    gamma: float
    beta: float
    scale: float
    base_energy: int
    prior_delta_energy: float
    temps: tuple[float, ...]
    weights: tuple[float, ...]
    mean_delta_energy: tuple[float, ...]
    mean_delta_energy_se: tuple[float, ...]
    mean_shrinks: tuple[float, ...]
    chain_phi: tuple[float, ...] = field(repr=False)
    n_chains: int = 0
    n_steps: int = 0
    burn_in: int = 0
    block_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain Python objects (JSON-serialisable)."""
        return asdict(self)


def _check_data(
    w: np.ndarray, b: float, X: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    w = np.asarray(w, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"Invalid X: shape {X.shape} (expected a non-empty [P, N] array)")
    if w.shape != (X.shape[1],):
        raise ValueError(f"Invalid w: shape {w.shape} (expected ({X.shape[1]},) to match X)")
    if y.shape != (X.shape[0],):
        raise ValueError(f"Invalid y: shape {y.shape} (expected ({X.shape[0]},) to match X)")
    if not np.all(np.abs(y) == 1.0):
        bad = np.unique(y[np.abs(y) != 1.0])[:5]
        raise ValueError(f"Invalid labels y: {bad.tolist()} (expected values in {{-1, +1}})")
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(X))):
        raise ValueError("Invalid w or X: non-finite entries (expected finite values)")
    if not (isinstance(b, int | float | np.floating | np.integer) and math.isfinite(b)):
        raise ValueError(f"Invalid b value: {b!r} (expected a finite float)")
    return w, float(b), X, y


def _check_pos(name: str, value: float) -> float:
    if not (isinstance(value, int | float | np.floating | np.integer) and math.isfinite(value)):
        raise ValueError(f"Invalid {name} value: {value!r} (expected a finite number > 0)")
    if not value > 0:
        raise ValueError(f"Invalid {name} value: {value!r} (expected a finite number > 0)")
    return float(value)


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"Invalid {name} value: {value!r} (expected an int >= {minimum})")
    return int(value)


def _normalize(w: np.ndarray, b: float, normalize: bool) -> tuple[np.ndarray, float, float]:
    if not normalize:
        return w, b, 1.0
    norm = float(np.linalg.norm(w))
    if norm == 0.0:
        raise ValueError("Invalid w: all zeros (cannot normalise to ||w||^2 = N; pass w != 0)")
    c = math.sqrt(w.size) / norm
    return w * c, b * c, c


def error_count(w: np.ndarray, b: float, X: np.ndarray, y: np.ndarray) -> int:
    """``E(w) = #{mu : y_mu (w . x_mu / sqrt(N) + b) <= 0}``.

    Raises:
        ValueError: on bad shapes, labels or non-finite values.
    """
    w, b, X, y = _check_data(w, b, X, y)
    return int(np.sum(y * (X @ w / math.sqrt(w.size) + b) <= 0))


def prior_delta_energy(
    w: np.ndarray,
    b: float,
    X: np.ndarray,
    y: np.ndarray,
    *,
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
    normalize: bool = True,
) -> float:
    """``<dE>_0 = E_{w' ~ N(w, I/(beta gamma))} E(w') - E(w)``, exact.

    Each margin ``y_mu h'_mu`` is ``N(y_mu h_mu, s_mu^2)`` with
    ``s_mu^2 = ||x_mu||^2 / (N beta gamma)``, so ``E_prior E(w') = sum_mu H(y_mu h_mu / s_mu)``.
    ``beta * <dE>_0`` is the first-order term of ``-Phi`` as ``beta -> 0`` at fixed
    ``beta gamma``.

    Raises:
        ValueError: on bad data or a bad ``gamma`` / ``beta``.
    """
    w, b, X, y = _check_data(w, b, X, y)
    gamma, beta = _check_pos("gamma", gamma), _check_pos("beta", beta)
    w, b, _ = _normalize(w, b, normalize)
    n = w.size
    margin = y * (X @ w / math.sqrt(n) + b)
    s = np.sqrt(np.einsum("pn,pn->p", X, X) / (n * beta * gamma))
    with np.errstate(divide="ignore"):
        p_err = np.where(s > 0, H(margin / np.where(s > 0, s, 1.0)), (margin <= 0).astype(float))
    return float(np.sum(p_err) - np.sum(margin <= 0))


def _delta_energy(m: np.ndarray, g: np.ndarray, e0: int) -> np.ndarray:
    """``dE`` per chain from the margins ``m`` [P, 1] and their shifts ``g`` [P, C]."""
    return np.count_nonzero(m + g <= 0, axis=0) - e0


def _quadrature(n: int, beta: float, power: float) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre in ``u`` on [0, 1], ``t = beta u^power``: ``int_0^beta f dt ~ c . f(t)``."""
    x, wq = np.polynomial.legendre.leggauss(n)
    u = (x + 1.0) / 2.0
    return beta * u**power, beta * (wq / 2.0) * power * u ** (power - 1.0)


def local_free_entropy(
    w: np.ndarray,
    b: float,
    X: np.ndarray,
    y: np.ndarray,
    *,
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
    n_temps: int = 8,
    n_steps: int = 40,
    n_chains: int = 8,
    burn_in: int = 10,
    block_size: int | None = 100,
    t_power: float = 2.0,
    seed: int = 0,
    normalize: bool = True,
) -> FreeEntropyResult:
    """Local free entropy ``Phi(w; gamma, beta)`` of ``sign(w . x / sqrt(N) + b)`` with the
    error-counting energy, by thermodynamic integration and elliptical slice sampling.

    ``Phi = log E_{w' ~ N(w, I/(beta gamma))} exp(-beta (E(w') - E(w))) = -int_0^beta <dE>_t dt``
    (see the module docstring for the estimator). ``(w, b)`` is first rescaled to
    ``||w||^2 = N`` unless ``normalize=False``.

    Defaults. ``gamma = 16, beta = 0.25``: each weight is perturbed by
    ``sigma = 1/sqrt(beta gamma) = 0.5`` against ``|w_i| ~ 1`` (``q = 1``), which moves every
    field by ``~0.5 sqrt(Delta)``, comparable to the margins of the Gaussian-mixture classifiers,
    so the measure sees the width of the region around ``w`` rather than its nearest samples.
    ``beta`` is a quarter nat per error because ``E`` is a count that grows with ``P``: at
    ``N = 1000, alpha = 8`` the prior already adds ``<dE>_0 ~ 200-400`` errors, so ``beta = 1``
    tilts ``p_beta`` so far from the prior that the chains lag behind it (measured: 4x more steps
    moved ``Phi`` by ~30 %), while at ``beta = 0.25`` they moved it by ~5 % and Hebbian and
    hinge classifiers still differ by ~100 standard errors. The sampler defaults (8 temperatures,
    10 + 40 steps of 8 chains, blocks of 100 coordinates) take ~2-3 s at ``N = 1000,
    P = 8000`` on one (shared) thread. For larger ``beta``, raise ``n_steps`` and ``burn_in``
    and check that ``phi`` no longer moves.

    Args:
        w: Weights ``[N]``.
        b: Bias (not perturbed).
        X: Training inputs ``[P, N]``.
        y: Labels ``[P]`` in {-1, +1}.
        gamma: Coupling ``gamma > 0``.
        beta: Inverse temperature ``beta > 0``.
        n_temps: Number of TI nodes (>= 1).
        n_steps: Measured ESS steps per node and chain (>= 1).
        n_chains: Independent chains (>= 2, for the error bar).
        burn_in: ESS steps per node before measuring (>= 0); chains are warm-started from the
            previous node's states.
        block_size: Coordinates of ``delta`` moved per ESS step (>= 1); ``None`` (or ``>= N``)
            moves all ``N`` at once.
        t_power: Node clustering ``t = beta u^t_power`` (>= 1).
        seed: Seed of the ``numpy.random.Generator``.
        normalize: Rescale ``(w, b)`` to ``||w||^2 = N`` first.

    Returns:
        :class:`FreeEntropyResult`.

    Raises:
        ValueError: on bad shapes, labels not in {-1, +1}, non-finite data, ``gamma`` or
            ``beta`` not finite and > 0, counts below their minimum, ``t_power < 1``, or
            ``w = 0`` with ``normalize=True``.

    Example:
        >>> from flatminima.gmm import sample, hebbian
        >>> X, y, v = sample(100, 2.0, 1.0, seed=0)
        >>> r = local_free_entropy(hebbian(X, y).w, 0.0, X, y, n_steps=10)
        >>> r.phi < 0
        True
    """
    w, b, X, y = _check_data(w, b, X, y)
    gamma, beta = _check_pos("gamma", gamma), _check_pos("beta", beta)
    n_temps, n_steps, n_chains, burn_in, block_size = _check_sampler_args(
        n_temps, n_steps, n_chains, burn_in, block_size, t_power, seed
    )
    w, b, scale = _normalize(w, b, normalize)
    n = X.shape[1]
    bsz = n if block_size is None else min(block_size, n)
    prior_de = prior_delta_energy(w, b, X, y, gamma=gamma, beta=beta, normalize=False)
    sampler = _SliceSampler(w, b, X, y, 1.0 / math.sqrt(beta * gamma), bsz, n_chains, seed)

    temps, weights = _quadrature(n_temps, beta, t_power)
    sums = np.zeros((n_temps, n_chains))
    shrinks = np.zeros(n_temps)
    for j, t in enumerate(temps):
        for step in range(burn_in + n_steps):
            n_rej = sampler.step(t)
            if step >= burn_in:
                sums[j] += sampler.de
                shrinks[j] += n_rej / n_chains
        log.debug("t=%.4g <dE>=%.4g shrinks/step=%.3g", t, sums[j].mean() / n_steps, shrinks[j])
    means = sums / n_steps  # [T, C]
    chain_phi = -(weights @ means)
    return FreeEntropyResult(
        phi=float(chain_phi.mean()),
        phi_se=float(chain_phi.std(ddof=1) / math.sqrt(n_chains)),
        gamma=gamma,
        beta=beta,
        scale=scale,
        base_energy=sampler.e0,
        prior_delta_energy=prior_de,
        temps=tuple(float(x) for x in temps),
        weights=tuple(float(x) for x in weights),
        mean_delta_energy=tuple(float(x) for x in means.mean(axis=1)),
        mean_delta_energy_se=tuple(
            float(x) for x in means.std(axis=1, ddof=1) / math.sqrt(n_chains)
        ),
        mean_shrinks=tuple(float(x) for x in shrinks / n_steps),
        chain_phi=tuple(float(x) for x in chain_phi),
        n_chains=n_chains,
        n_steps=n_steps,
        burn_in=burn_in,
        block_size=bsz,
    )


def _check_sampler_args(
    n_temps: int,
    n_steps: int,
    n_chains: int,
    burn_in: int,
    block_size: int | None,
    t_power: float,
    seed: int,
) -> tuple[int, int, int, int, int | None]:
    """Validate the sampler settings of :func:`local_free_entropy`."""
    counts = (
        _check_count("n_temps", n_temps, 1),
        _check_count("n_steps", n_steps, 1),
        _check_count("n_chains", n_chains, 2),
        _check_count("burn_in", burn_in, 0),
    )
    if block_size is not None:
        block_size = _check_count("block_size", block_size, 1)
    if not (isinstance(t_power, int | float) and math.isfinite(t_power) and t_power >= 1):
        raise ValueError(f"Invalid t_power value: {t_power!r} (expected a finite number >= 1)")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"Invalid seed value: {seed!r} (expected an int >= 0)")
    return (*counts, block_size)


class _SliceSampler:
    """``n_chains`` elliptical-slice chains on the perturbation ``delta ~ N(0, sigma^2 I)``.

    The state is held in field space: ``g = Ay delta`` [P, C] (the shift of every margin), and
    ``de`` the number of extra training errors per chain. Each :meth:`step` moves one block of
    ``bsz`` coordinates (all of them when ``bsz == N``; then ``delta`` itself is not stored).
    """

    def __init__(
        self,
        w: np.ndarray,
        b: float,
        X: np.ndarray,
        y: np.ndarray,
        sigma: float,
        bsz: int,
        n_chains: int,
        seed: int,
    ) -> None:
        n = w.size
        self.rng = np.random.default_rng(seed)
        self.sigma, self.bsz, self.n_chains = sigma, bsz, n_chains
        self.full = bsz == n
        # AyT [N, P]: row i is y_mu X_mu,i / sqrt(N) for all mu, rows in a random order so that
        # contiguous row slices are random blocks of coordinates (the prior is isotropic).
        perm = self.rng.permutation(n) if not self.full else np.arange(n)
        self.AyT = np.ascontiguousarray((X[:, perm] * (y / math.sqrt(n))[:, None]).T)
        margin = y * (X @ w / math.sqrt(n) + b)  # [P]
        self.e0 = int(np.sum(margin <= 0))
        self.m = margin[:, None]
        # exact draws from p_0 = prior: delta [N, C] (kept only for block moves), g = Ay delta
        delta = sigma * self.rng.standard_normal((n, n_chains))
        self.g = self.AyT.T @ delta
        self.delta = np.empty((0, n_chains)) if self.full else delta
        self.de = _delta_energy(self.m, self.g, self.e0).astype(np.float64)
        self.starts = list(range(0, n, bsz))
        self.block = 0

    def step(self, t: float) -> int:
        """One elliptical slice step of every chain at temperature ``t``; return the number of
        rejected proposals (shrinks) summed over chains."""
        lo_i = self.starts[self.block]
        hi_i = min(lo_i + self.bsz, self.AyT.shape[0])
        self.block = (self.block + 1) % len(self.starts)
        nu = self.sigma * self.rng.standard_normal((hi_i - lo_i, self.n_chains))
        a_blk = self.AyT[lo_i:hi_i]
        g_nu = a_blk.T @ nu  # [P, C]
        # g' = g + (cos th - 1) g_b + sin th g_nu, with g_b = Ay_B delta_B (= g for full)
        g_b = self.g if self.full else a_blk.T @ self.delta[lo_i:hi_i]
        # slice level: accept iff -t dE' > -t dE + log U  <=>  dE' < dE - log(U) / t
        thresh = self.de - np.log(self.rng.random(self.n_chains)) / t
        return self._shrink(thresh, g_b, g_nu, nu, lo_i, hi_i)

    def _shrink(
        self,
        thresh: np.ndarray,
        g_b: np.ndarray,
        g_nu: np.ndarray,
        nu: np.ndarray,
        lo_i: int,
        hi_i: int,
    ) -> int:
        """Propose angles until every chain accepts (or ``_MAX_SHRINKS``); first angle uniform
        on the ellipse, bracket ``[th - 2 pi, th]`` shrunk towards ``th = 0`` (the current
        state) on rejection (Murray, Adams, MacKay 2010, Fig. 2)."""
        two_pi = 2.0 * math.pi
        n_chains, g, de, rng = self.n_chains, self.g, self.de, self.rng
        th = rng.uniform(0.0, two_pi, n_chains)
        th_lo, th_hi = th - two_pi, th.copy()
        todo = np.arange(n_chains)
        n_rej = 0
        for _ in range(_MAX_SHRINKS):
            every = todo.size == n_chains
            c, s = np.cos(th[todo]), np.sin(th[todo])
            if every:
                g_prop = g + (c - 1.0) * g_b + s * g_nu
            else:
                g_prop = g[:, todo] + (c - 1.0) * g_b[:, todo] + s * g_nu[:, todo]
            de_prop = _delta_energy(self.m, g_prop, self.e0)
            ok = de_prop < thresh[todo]
            acc = todo[ok]
            if acc.size:
                g[:, acc] = g_prop if every and acc.size == n_chains else g_prop[:, ok]
                de[acc] = de_prop[ok]
                if not self.full:
                    ca, sa = np.cos(th[acc]), np.sin(th[acc])
                    d = self.delta
                    d[lo_i:hi_i, acc] = d[lo_i:hi_i, acc] * ca + nu[:, acc] * sa
            todo = todo[~ok]
            if todo.size == 0:
                break
            n_rej += todo.size
            neg = th[todo] < 0
            th_lo[todo] = np.where(neg, th[todo], th_lo[todo])
            th_hi[todo] = np.where(neg, th_hi[todo], th[todo])
            th[todo] = rng.uniform(th_lo[todo], th_hi[todo])
        # chains still rejecting after _MAX_SHRINKS stay where they are (th -> 0 limit)
        return n_rej
