"""Local energy: the increase of the training loss/error under random weight noise.

Pittorino et al., "Entropic gradient descent algorithms and wide flat minima", ICLR 2021
(arXiv:2006.07897), "flatness measures": the local energy

    delta_E(w, sigma) = E_xi[ E_train(w * (1 + sigma * xi)) ] - E_train(w),   xi ~ N(0, I),

is a cheap flatness measure that correlates with test accuracy. ``noise="additive"`` uses
``w + sigma * xi`` instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatminima.flatness.perturb import (
    Batches,
    NoisePerturber,
    ParamFilter,
    materialize_batches,
    mean_and_stderr,
    model_device,
    preserve_state,
    select_parameters,
)

logger = logging.getLogger(__name__)

__all__ = ["LocalEnergyResult", "local_energy", "evaluate_batches", "recalibrate_bn"]

_VALID_BN = ("eval", "recalibrate")
_VALID_NOISE = ("multiplicative", "additive")

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class LocalEnergyResult:
    """Local energy curve ``delta_E(sigma)`` with standard errors over noise draws.

    Attributes:
        sigmas: noise strengths, in the order given.
        delta_loss: mean over draws of ``loss(perturbed) - base_loss``, one per sigma.
        delta_loss_se: standard error of ``delta_loss`` over draws (NaN for one draw).
        delta_error: same for the classification error (fraction misclassified); ``None``
            when ``classification=False``.
        delta_error_se: standard error of ``delta_error``; ``None`` when not a classifier.
        base_loss: ``E_train(w)`` (mean loss over the samples).
        base_error: training error at ``w``; ``None`` when not a classifier.
        n_draws: noise draws per sigma.
        n_samples: samples the energy is averaged over.
        noise: ``"multiplicative"`` or ``"additive"``.
        bn: ``"eval"`` or ``"recalibrate"``.
        loss_draws: per sigma, the perturbed loss of every draw (not the difference).
        error_draws: per sigma, the perturbed error of every draw (``None`` if not a classifier).
    """

    sigmas: list[float]
    delta_loss: list[float]
    delta_loss_se: list[float]
    delta_error: list[float] | None
    delta_error_se: list[float] | None
    base_loss: float
    base_error: float | None
    n_draws: int
    n_samples: int
    noise: str = "multiplicative"
    bn: str = "eval"
    loss_draws: list[list[float]] = field(default_factory=list, repr=False)
    error_draws: list[list[float]] | None = field(default=None, repr=False)

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per sigma (CSV-ready); error columns are NaN when not a classifier."""
        rows = []
        for i, s in enumerate(self.sigmas):
            rows.append(
                {
                    "sigma": s,
                    "delta_loss": self.delta_loss[i],
                    "delta_loss_se": self.delta_loss_se[i],
                    "delta_error": math.nan if self.delta_error is None else self.delta_error[i],
                    "delta_error_se": (
                        math.nan if self.delta_error_se is None else self.delta_error_se[i]
                    ),
                    "base_loss": self.base_loss,
                    "base_error": math.nan if self.base_error is None else self.base_error,
                    "n_draws": self.n_draws,
                    "n_samples": self.n_samples,
                    "noise": self.noise,
                    "bn": self.bn,
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain Python objects (JSON-serialisable)."""
        return asdict(self)


def _batch_error(out: Tensor, y: Tensor) -> Tensor:
    """Number of misclassified samples in a batch, as a 0-d tensor (no host sync)."""
    if out.ndim >= 2 and out.shape[1] > 1:
        pred = out.argmax(dim=1)
        if y.ndim == out.ndim and y.shape == out.shape:  # one-hot / soft targets
            y = y.argmax(dim=1)
        return (pred != y).sum()
    # single output: sign / threshold-at-zero classifier; targets in {0,1} or {-1,+1}
    return ((out.reshape(-1) > 0) != (y.reshape(-1) > 0)).sum()


def evaluate_batches(
    model: nn.Module, batches: Batches, loss_fn: LossFn, *, classification: bool = True
) -> tuple[float, float | None]:
    """Mean loss and error of ``model`` over ``batches`` (inference mode, one host sync).

    The loss of a batch of ``n_b`` samples is weighted by ``n_b``, so with a ``loss_fn`` that
    averages over its batch the result is the mean over all samples.
    """
    n = 0
    loss_sum: Tensor | None = None
    err_sum: Tensor | None = None
    with torch.inference_mode():
        for x, y in batches:
            out = model(x)
            b = x.shape[0]
            lb = loss_fn(out, y).detach() * b
            loss_sum = lb if loss_sum is None else loss_sum + lb
            if classification:
                eb = _batch_error(out, y)
                err_sum = eb if err_sum is None else err_sum + eb
            n += b
    if loss_sum is None:
        raise ValueError("batches is empty: nothing to evaluate")
    loss = loss_sum.item() / n
    err = None if err_sum is None else err_sum.item() / n
    return loss, err


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def recalibrate_bn(model: nn.Module, batches: Batches) -> None:
    """Recompute BatchNorm running statistics of ``model`` on ``batches`` (in place).

    Like ``torch.optim.swa_utils.update_bn``: running stats are reset and re-estimated as a
    cumulative average (``momentum=None``) with only the BatchNorm layers in train mode (dropout
    and the like stay as they are). The BatchNorm layers are put back in eval mode and their
    momenta restored; the caller restores the original modes.
    """
    bns = _bn_modules(model)
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for x, _ in batches:
                model(x)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
            m.eval()


def local_energy(
    model: nn.Module,
    data: object,
    sigmas: Sequence[float] | float,
    *,
    loss_fn: LossFn = F.cross_entropy,
    noise: str = "multiplicative",
    n_draws: int = 20,
    bn: str = "eval",
    params: ParamFilter = None,
    max_samples: int | None = None,
    batch_size: int = 256,
    bn_data: object | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    classification: bool = True,
) -> LocalEnergyResult:
    """Local energy ``delta_E(w, sigma)`` of ``model`` at its current weights ``w``.

    For each ``sigma`` and each draw ``d = 0..n_draws-1`` the selected parameters are set to

        w_d = w * (1 + sigma * xi_d)   (multiplicative)   or   w_d = w + sigma * xi_d   (additive),

    ``xi_d ~ N(0, I)``, and ``E_train(w_d)`` is evaluated over the data (mean of ``loss_fn`` over
    samples, and the classification error). The result is the mean over draws of
    ``E_train(w_d) - E_train(w)`` with its standard error ``std_d / sqrt(n_draws)``. Buffers are
    never perturbed. Draw ``d`` uses the seed ``seed + d`` for every sigma (common random
    numbers: the curve is smooth in sigma and a sigma's value does not depend on the others).

    BatchNorm: ``bn="eval"`` uses the running statistics stored in the model (paper setting);
    ``bn="recalibrate"`` re-estimates them on ``bn_data`` (default: the measured data) for every
    draw *and* for the unperturbed ``w``, so that ``sigma = 0`` gives exactly zero.

    The model is evaluated in eval mode and returned bit for bit as it was (parameters, buffers,
    modes, ``requires_grad``), also on error; the global RNGs are untouched. Parameters are
    perturbed in place, so views into a flat buffer (rSGD replicas) work.

    Args:
        model: the network (its parameters must live on ``device``).
        data: ``(inputs, targets)`` tensors or an iterable of ``(x, y)`` batches. Materialised
            once on the device.
        sigmas: one or more noise strengths ``>= 0``.
        loss_fn: ``loss_fn(output, target) -> scalar``, averaged over the batch.
        noise: ``"multiplicative"`` (default, paper) or ``"additive"``.
        n_draws: noise draws per sigma (``>= 1``).
        bn: ``"eval"`` or ``"recalibrate"``.
        params: parameter filter (names or predicate ``(name, p) -> bool``); default all.
        max_samples: use only the first ``max_samples`` samples of ``data``.
        batch_size: evaluation batch size when ``data`` is a tensor pair.
        bn_data: data for BatchNorm recalibration (same forms as ``data``).
        seed: seed of the private noise generator.
        device: where data is moved; defaults to the model's device and must match it.
        classification: also report the error (argmax for multi-output, sign for one output).

    Returns:
        A :class:`LocalEnergyResult`.

    Raises:
        ValueError: a negative or non-finite sigma, ``n_draws < 1``, unknown ``noise``/``bn``,
            empty data, a model without parameters, a bad parameter filter, or a ``device``
            different from the model's.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> r = local_energy(net, (x, y), [0.0, 0.1], n_draws=4)
        >>> r.delta_loss[0]
        0.0
    """
    sig = _check_args(sigmas, n_draws, noise, bn)
    chosen = select_parameters(model, params)
    dev = _measure_device(model, device)
    with preserve_state(model, params=False):
        # inside the RNG guard: iterating a shuffling DataLoader draws from the global RNG
        batches = materialize_batches(
            data, max_samples=max_samples, batch_size=batch_size, device=dev
        )
        n_samples = sum(x.shape[0] for x, _ in batches)
        recal = bn == "recalibrate" and bool(_bn_modules(model))
        if bn == "recalibrate" and not recal:
            logger.info("bn='recalibrate' on a model without BatchNorm: nothing to recalibrate")
        bn_batches = (
            batches
            if bn_data is None or not recal
            else materialize_batches(bn_data, batch_size=batch_size, device=dev)
        )
        model.eval()
        perturber = NoisePerturber([p for _, p in chosen], noise)
        try:
            if recal:
                recalibrate_bn(model, bn_batches)
            base = evaluate_batches(model, batches, loss_fn, classification=classification)
            loss_draws, err_draws = _draws(
                model,
                batches,
                loss_fn,
                classification,
                sig,
                n_draws,
                seed,
                perturber,
                bn_batches if recal else None,
                base,
            )
            logger.debug(
                "local_energy: %d sigmas x %d draws on %d samples", len(sig), n_draws, n_samples
            )
        finally:
            perturber.restore_()
    return _result(sig, loss_draws, err_draws, base, classification, n_draws, n_samples, noise, bn)


def _check_args(sigmas: Sequence[float] | float, n_draws: int, noise: str, bn: str) -> list[float]:
    """Validate the arguments of :func:`local_energy`; return the sigmas as floats."""
    sig = [float(sigmas)] if isinstance(sigmas, (int, float)) else [float(s) for s in sigmas]
    if not sig:
        raise ValueError("sigmas is empty; give at least one noise strength >= 0")
    for s in sig:
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"sigma must be finite and >= 0, got {s}")
    if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 1:
        raise ValueError(f"n_draws must be an integer >= 1, got {n_draws!r}")
    if noise not in _VALID_NOISE:
        raise ValueError(f"noise must be one of {_VALID_NOISE}, got {noise!r}")
    if bn not in _VALID_BN:
        raise ValueError(f"bn must be one of {_VALID_BN}, got {bn!r}")
    return sig


def _measure_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """The device to measure on: the model's; a different ``device`` is refused."""
    mdev = model_device(model)
    dev = mdev if device is None else torch.device(device)
    if dev.type != mdev.type or (
        dev.index is not None and mdev.index is not None and dev.index != mdev.index
    ):
        raise ValueError(
            f"device={device!r} differs from the model's device {mdev}; move the "
            "model first (measures never move models)"
        )
    return dev


def _draws(
    model: nn.Module,
    batches: Batches,
    loss_fn: LossFn,
    classification: bool,
    sig: list[float],
    n_draws: int,
    seed: int,
    perturber: NoisePerturber,
    bn_batches: Batches | None,
    base: tuple[float, float | None],
) -> tuple[list[list[float]], list[list[float]]]:
    """Loss and error of every (sigma, draw), draw-major.

    xi_d is generated once per draw and reused for every sigma (common random numbers; noise
    generation costs once per draw, not per (draw, sigma)). ``bn_batches`` set means BatchNorm
    statistics are recalibrated after each perturbation.
    """
    base_loss, base_err = base
    loss_draws: list[list[float]] = [[] for _ in sig]
    err_draws: list[list[float]] = [[] for _ in sig]
    nonzero = [i for i, s in enumerate(sig) if s != 0.0]
    for i, s in enumerate(sig):
        if s == 0.0:  # w * (1 + 0 xi) == w exactly: no need to evaluate
            loss_draws[i] = [base_loss] * n_draws
            err_draws[i] = [base_err if base_err is not None else math.nan] * n_draws
    for d in range(n_draws if nonzero else 0):
        xi = perturber.draw(seed + d)
        for i in nonzero:
            perturber.apply_(sig[i], xi)
            if bn_batches is not None:
                recalibrate_bn(model, bn_batches)
            lv, ev = evaluate_batches(model, batches, loss_fn, classification=classification)
            loss_draws[i].append(lv)
            err_draws[i].append(ev if ev is not None else math.nan)
        del xi
    return loss_draws, err_draws


def _result(
    sig: list[float],
    loss_draws: list[list[float]],
    err_draws: list[list[float]],
    base: tuple[float, float | None],
    classification: bool,
    n_draws: int,
    n_samples: int,
    noise: str,
    bn: str,
) -> LocalEnergyResult:
    """Means and standard errors over draws of the increases over the unperturbed values."""
    base_loss, base_err = base
    dl, dl_se, de, de_se = [], [], [], []
    for ls, es in zip(loss_draws, err_draws):
        m, se = mean_and_stderr([v - base_loss for v in ls])
        dl.append(m)
        dl_se.append(se)
        if base_err is not None:
            m, se = mean_and_stderr([v - base_err for v in es])
            de.append(m)
            de_se.append(se)
    return LocalEnergyResult(
        sigmas=sig,
        delta_loss=dl,
        delta_loss_se=dl_se,
        delta_error=de if classification else None,
        delta_error_se=de_se if classification else None,
        base_loss=base_loss,
        base_error=base_err,
        n_draws=n_draws,
        n_samples=n_samples,
        noise=noise,
        bn=bn,
        loss_draws=loss_draws,
        error_draws=err_draws if classification else None,
    )
