"""Correlation study: do flatter networks generalize better? (Pittorino et al., ICLR 2021, Sec. 6)

Many networks are trained over a grid of settings (optimizer, learning rate, batch size, coupling,
...); for each, flatness is measured on a fixed training subset and related to test error and to
the generalization gap ``test_error - train_error`` by rank correlations:

* Kendall ``tau = (concordant - discordant) / sqrt((n0 - n1)(n0 - n2))`` (tau-b, ties handled) and
  Spearman ``rho`` (Pearson correlation of ranks), with scipy's two-sided p-values;
* percentile bootstrap confidence intervals: ``n_boot`` resamples of the networks with
  replacement, the ``(1 - ci)/2`` and ``(1 + ci)/2`` quantiles of the resampled statistic
  (resamples where a variable is constant are dropped).

Measures (all "sharpness": larger = sharper, so a positive correlation with test error is the
paper's claim): local energy ``delta_E(sigma)`` of the train error and of the loss at each sigma,
the Hessian trace (Hutchinson), and for small networks ``-Phi``, minus the local free entropy
(``Phi <= 0``, closer to 0 = flatter). With the free entropy, the table also shows how the
measures correlate with each other.

Grid file (YAML)::

    description: MLPs on digits
    base: {data: digits, model: mlp, epochs: 4, ...}     # TrainConfig keys
    grid: {optimizer: [sgd, rsgd], lr: [0.02, 0.1], ...} # cartesian product
    max_runs: 24          # optional: the first N grid points
    sample: 24            # optional: a random subset of N points (seeded by `seed`)
    seed: 0
    measure: {sigmas: [...], n_draws: 5, n_samples: 1000, hessian_samples: 10,
              free_entropy: auto, free_entropy_max_params: 5000,
              free_entropy_options: {gamma: 1.0, beta: 1000.0, n_t: 8, ...}}
    n_boot: 1000
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from flatminima.flatness.local_entropy import local_free_entropy
from flatminima.models import build_model, count_parameters
from flatminima.studies._runs import DataCache, MeasureSettings, measure_run, train_run
from flatminima.studies.executors import SerialExecutor
from flatminima.studies.presets import find_preset, parse_grid
from flatminima.studies.report import write_study_report
from flatminima.studies.stats import holm
from flatminima.train import TrainConfig

log = logging.getLogger(__name__)

__all__ = [
    "CorrelationResult",
    "StudyResult",
    "correlation_study",
    "load_study_grid",
    "rank_correlation",
]

_GRID_KEYS = (
    "description",
    "base",
    "grid",
    "max_runs",
    "sample",
    "seed",
    "measure",
    "n_boot",
    "preregistered",
)
_PREREG_KEYS = ("measures", "sigmas", "targets", "did_not_train", "interval")
_PREREG_MEASURES = ("local_energy_error", "local_energy_loss", "hessian_trace", "neg_free_entropy")
_MEASURE_KEYS = (
    "sigmas",
    "n_draws",
    "n_samples",
    "hessian_samples",
    "free_entropy",
    "free_entropy_max_params",
    "free_entropy_options",
)
DEFAULT_FREE_ENTROPY = {
    "gamma": 1.0,
    "beta": 1000.0,
    "n_t": 8,
    "n_chains": 2,
    "n_steps": 60,
    "burn_in": 30,
}
TARGETS = ("test_error", "gen_gap")


@dataclass
class CorrelationResult:
    """Kendall tau and Spearman rho with scipy p-values and bootstrap confidence intervals."""

    n: int
    kendall_tau: float
    kendall_p: float
    kendall_ci: tuple[float, float]
    spearman_rho: float
    spearman_p: float
    spearman_ci: tuple[float, float]

    def to_row(self) -> dict[str, float]:
        return {
            "n": self.n,
            "kendall_tau": self.kendall_tau,
            "tau_ci_low": self.kendall_ci[0],
            "tau_ci_high": self.kendall_ci[1],
            "kendall_p": self.kendall_p,
            "spearman_rho": self.spearman_rho,
            "rho_ci_low": self.spearman_ci[0],
            "rho_ci_high": self.spearman_ci[1],
            "spearman_p": self.spearman_p,
        }


def kendall_tau_b_rows(x: np.ndarray, y: np.ndarray, chunk_elems: int = 4_000_000) -> np.ndarray:
    """Kendall tau-b of every row pair ``(x[b], y[b])`` (arrays ``[B, n]``), vectorised.

    ``tau_b = sum_ij sx_ij sy_ij / sqrt(sum_ij sx_ij^2 * sum_ij sy_ij^2)`` with
    ``sx_ij = sign(x_i - x_j)``: concordant minus discordant pairs over the square root of the
    untied pair counts (each pair is counted twice everywhere, which cancels).
    """
    out = np.empty(x.shape[0])
    step = max(1, chunk_elems // max(1, x.shape[1] ** 2))
    for b in range(0, x.shape[0], step):
        sx = np.sign(x[b : b + step, :, None] - x[b : b + step, None, :])
        sy = np.sign(y[b : b + step, :, None] - y[b : b + step, None, :])
        num = (sx * sy).sum(axis=(1, 2))
        den = np.sqrt((sx * sx).sum(axis=(1, 2)) * (sy * sy).sum(axis=(1, 2)))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[b : b + step] = num / den
    return out


def spearman_rho_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho of every row pair: Pearson correlation of average ranks, vectorised."""
    from scipy.stats import rankdata

    if x.shape[0] == 0:
        return np.empty(0)
    rx = rankdata(x, axis=1)
    ry = rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(1) / np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))


def rank_correlation(
    x: Sequence[float],
    y: Sequence[float],
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    method: str = "percentile",
) -> CorrelationResult:
    """Kendall tau-b and Spearman rho between ``x`` and ``y`` with bootstrap intervals.

    Args:
        x, y: paired samples (NaN pairs are dropped).
        n_boot: bootstrap resamples (0: no interval, NaN bounds).
        ci: confidence level of the interval, in (0, 1).
        seed: seed of the resampling generator.
        method: ``"percentile"`` (quantiles of the resampled statistic) or ``"bca"``
            (bias-corrected and accelerated, :func:`scipy.stats.bootstrap` around the
            vectorised statistics; NaN bounds when the resamples are degenerate).

    Raises:
        ValueError: different lengths, fewer than 3 valid pairs, ``ci`` outside (0, 1),
            ``n_boot < 0`` or an unknown ``method``.
    """
    if method not in ("percentile", "bca"):
        raise ValueError(f"Invalid interval method {method!r}; valid: percentile, bca")
    from scipy import stats

    if len(x) != len(y):
        raise ValueError(f"x and y must have equal lengths, got {len(x)} and {len(y)}")
    if not 0 < ci < 1:
        raise ValueError(f"Invalid ci {ci!r}: must be in (0, 1)")
    if n_boot < 0:
        raise ValueError(f"Invalid n_boot {n_boot!r}: must be >= 0")
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    n = len(xa)
    if n < 3:
        raise ValueError(f"Need at least 3 finite pairs for a rank correlation, got {n}")
    tau, tau_p = stats.kendalltau(xa, ya)
    rho, rho_p = stats.spearmanr(xa, ya)
    if method == "bca":
        return CorrelationResult(
            n,
            float(tau),
            float(tau_p),
            bca_interval(xa, ya, kendall_tau_b_rows, n_boot, ci, seed),
            float(rho),
            float(rho_p),
            bca_interval(xa, ya, spearman_rho_rows, n_boot, ci, seed),
        )
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    # resamples where a variable is constant have no rank correlation: dropped
    idx = idx[(np.ptp(xa[idx], axis=1) > 0) & (np.ptp(ya[idx], axis=1) > 0)]
    taus = kendall_tau_b_rows(xa[idx], ya[idx])
    rhos = spearman_rho_rows(xa[idx], ya[idx])
    q = [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100]

    def interval(vals: np.ndarray) -> tuple[float, float]:
        vals = vals[np.isfinite(vals)]
        if not len(vals):
            return (math.nan, math.nan)
        lo, hi = np.percentile(vals, q)
        return (float(lo), float(hi))

    return CorrelationResult(
        n, float(tau), float(tau_p), interval(taus), float(rho), float(rho_p), interval(rhos)
    )


def bca_interval(
    x: np.ndarray, y: np.ndarray, rows: Any, n_boot: int, ci: float, seed: int
) -> tuple[float, float]:
    """BCa bootstrap interval of a paired row statistic (``rows(x[B, n], y[B, n]) -> [B]``)
    by :func:`scipy.stats.bootstrap` (``paired=True``, ``method="BCa"``); NaN bounds for
    ``n_boot = 0`` or degenerate resamples."""
    import warnings

    from scipy import stats

    if n_boot == 0:
        return (math.nan, math.nan)

    def statistic(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        a, b = np.moveaxis(a, axis, -1), np.moveaxis(b, axis, -1)
        flat = rows(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))
        return np.asarray(flat).reshape(a.shape[:-1])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples: NaN bounds, reported as such
        res = stats.bootstrap(
            (x, y),
            statistic,
            paired=True,
            vectorized=True,
            n_resamples=n_boot,
            confidence_level=ci,
            method="BCa",
            random_state=seed,
        )
    lo, hi = res.confidence_interval
    return (float(lo), float(hi))


def load_study_grid(spec: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read and validate a study grid (YAML file or mapping; see the module docstring).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown top-level or ``measure`` keys, a bad or empty grid, a base key that
            is not a TrainConfig key, or bad ``max_runs``/``sample``.
    """
    if isinstance(spec, Mapping):
        values, where = dict(spec), "study grid"
    else:
        path = Path(spec)
        if not path.is_file():
            try:  # a shipped grid by name, e.g. "study-digits-mlp"
                path = find_preset(str(spec))
            except FileNotFoundError:
                raise FileNotFoundError(f"Study grid file not found: {path}") from None
        values, where = yaml.safe_load(path.read_text()) or {}, str(path)
        if not isinstance(values, dict):
            raise ValueError(f"Study grid {where} must be a YAML mapping")
    bad = sorted(set(values) - set(_GRID_KEYS))
    if bad:
        raise ValueError(f"Unknown key(s) {bad} in {where}; valid: {', '.join(_GRID_KEYS)}")
    base = dict(values.get("base") or {})
    TrainConfig.from_dict({k: v for k, v in base.items()})  # unknown keys fail here
    if not values.get("grid"):
        raise ValueError(f"Empty grid in {where}: give 'grid: {{key: [values], ...}}'")
    grid = parse_grid(dict(values["grid"]))
    measure = dict(values.get("measure") or {})
    bad = sorted(set(measure) - set(_MEASURE_KEYS))
    if bad:
        raise ValueError(
            f"Unknown measure key(s) {bad} in {where}; valid: {', '.join(_MEASURE_KEYS)}"
        )
    for key in ("max_runs", "sample"):
        v = values.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"Invalid {key} {v!r} in {where}: must be an integer >= 1")
    prereg = _check_prereg(values.get("preregistered"), measure, where)
    return {**values, "base": base, "grid": grid, "measure": measure, "preregistered": prereg}


def _check_prereg(pre: Any, measure: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    """Validate the pre-registration (fixed before the run; see :func:`correlation_study`)."""
    if pre is None:
        return None
    if not isinstance(pre, Mapping):
        raise ValueError(f"Invalid preregistered {pre!r} in {where}: a mapping")
    bad = sorted(set(pre) - set(_PREREG_KEYS))
    if bad:
        raise ValueError(f"Unknown preregistered key(s) {bad} in {where}; valid: {_PREREG_KEYS}")
    out: dict[str, Any] = {
        "measures": list(pre.get("measures", _PREREG_MEASURES)),
        "sigmas": [float(s) for s in pre.get("sigmas", measure.get("sigmas", []))],
        "targets": list(pre.get("targets", TARGETS)),
        "did_not_train": float(pre.get("did_not_train", 1.0)),
        "interval": str(pre.get("interval", "bca")).lower(),
    }
    bad = [m for m in out["measures"] if m not in _PREREG_MEASURES]
    bad += [t for t in out["targets"] if t not in TARGETS]
    if bad:
        raise ValueError(
            f"Invalid preregistered measure/target {bad} in {where}; measures: "
            f"{', '.join(_PREREG_MEASURES)}; targets: {', '.join(TARGETS)}"
        )
    measured = [float(s) for s in measure.get("sigmas", [0.05, 0.1, 0.2, 0.3, 0.5])]
    if sorted(out["sigmas"]) != sorted(measured):
        raise ValueError(
            f"Preregistered sigmas {out['sigmas']} in {where} differ from measure.sigmas "
            f"{measured}: every measured sigma is reported"
        )
    if not 0 < out["did_not_train"] <= 1:
        raise ValueError(
            f"Invalid did_not_train {out['did_not_train']!r} in {where}: a training error in (0, 1]"
        )
    if out["interval"] not in ("bca", "percentile"):
        raise ValueError(f"Invalid interval {out['interval']!r} in {where}: bca or percentile")
    return out


def study_points(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The grid points of a validated study grid (cartesian product, then max_runs/sample)."""
    grid = spec["grid"]
    keys = list(grid)
    points = [dict(zip(keys, v)) for v in itertools.product(*(grid[k] for k in keys))]
    if spec.get("sample"):
        k = min(int(spec["sample"]), len(points))
        idx = sorted(random.Random(int(spec.get("seed") or 0)).sample(range(len(points)), k))
        points = [points[i] for i in idx]
    if spec.get("max_runs"):
        points = points[: int(spec["max_runs"])]
    return points


def _check_free_entropy_options(opts: Mapping[str, Any]) -> None:
    import inspect

    params = inspect.signature(local_free_entropy).parameters
    valid = sorted(k for k in params if k not in ("model", "data", "seed", "batch_size"))
    bad = sorted(set(opts) - set(valid))
    if bad:
        raise ValueError(f"Unknown free_entropy_options {bad}; valid: {', '.join(valid)}")


def _exclude(
    records: list[dict[str, Any]], prereg: Mapping[str, Any] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split off the networks that did not train (final training error above the
    pre-registered ``did_not_train``); they are listed in the report, never correlated."""
    if prereg is None:
        return records, []
    limit = prereg["did_not_train"]
    bad = [r for r in records if r["train_error"] is not None and r["train_error"] > limit]
    for r in bad:
        log.info(
            "network %s did not train (train error %.3f > %g)",
            r["run_dir"],
            r["train_error"],
            limit,
        )
    return [r for r in records if r not in bad], bad


def _variants(measures: list[str], prereg: Mapping[str, Any] | None) -> list[str]:
    """The measure columns to report: with a pre-registration every pre-registered measure at
    every pre-registered sigma (error- and loss-based), else every measured column."""
    if prereg is None:
        return measures
    out = []
    for m in prereg["measures"]:
        if m.startswith("local_energy_"):
            out += [f"{m}_s{s:g}" for s in prereg["sigmas"] if f"{m}_s{s:g}" in measures]
        elif m in measures:
            out.append(m)
    return out


def _correlate(
    records: list[dict[str, Any]],
    measures: list[str],
    prereg: Mapping[str, Any] | None,
    n_boot: int,
) -> list[dict[str, Any]]:
    """Every variant x target (Holm-adjusted Kendall p over them), then -Phi against the rest."""

    if len(records) < 3:
        log.warning("only %d networks: at least 3 are needed for rank correlations", len(records))
        return []
    method = prereg["interval"] if prereg else "percentile"
    targets = prereg["targets"] if prereg else list(TARGETS)
    rows = []
    for m in _variants(measures, prereg):
        for t in targets:
            xs = [r.get(m, math.nan) for r in records]
            try:
                c = rank_correlation(xs, [r[t] for r in records], n_boot=n_boot, method=method)
            except ValueError as exc:
                log.warning("no correlation of %s with %s: %s", m, t, exc)
                continue
            rows.append({"measure": m, "target": t, **c.to_row(), "interval": method})
    for r, p in zip(rows, holm([float(r["kendall_p"]) for r in rows])):
        r["kendall_p_holm"] = p
    if "neg_free_entropy" in measures:
        phi = [r.get("neg_free_entropy", math.nan) for r in records]
        for m in measures:
            if m == "neg_free_entropy":
                continue
            try:
                c = rank_correlation(phi, [r.get(m, math.nan) for r in records], n_boot=n_boot)
            except ValueError:
                continue
            rows.append({"measure": "neg_free_entropy", "target": m, **c.to_row()})
    return rows


def _network_record(
    i: int,
    point: Mapping[str, Any],
    cfg: TrainConfig,
    run_dir: Path,
    data: DataCache,
    base: MeasureSettings,
    fe: tuple[Any, int, dict[str, Any]],
) -> dict[str, Any] | None:
    """Measure one trained network (``None`` if it diverged: left out of the correlations)."""
    summary = train_run(cfg, run_dir, data)  # trained by the executor: read back here
    if summary.get("status") != "complete":
        log.warning("network %s diverged; left out of the correlations", run_dir)
        return None
    splits = data.get(cfg)
    n_params = count_parameters(
        build_model(cfg.model, splits.input_shape, splits.num_classes, **cfg.model_kwargs)
    )
    fe_mode, fe_max, fe_opts = fe
    use_fe = fe_mode is True or (fe_mode == "auto" and n_params <= fe_max)
    settings = MeasureSettings(**{**base.__dict__, "free_entropy": fe_opts if use_fe else None})
    meas = measure_run(cfg, run_dir, data, settings)
    final = summary.get("final", {})
    rec: dict[str, Any] = {
        "run": i,
        "run_dir": str(run_dir),
        "optimizer": cfg.optimizer,
        **point,
        "n_params": n_params,
        "test_error": final.get("test_error"),
        "train_error": final.get("train_error"),
    }
    rec["gen_gap"] = rec["test_error"] - rec["train_error"]
    le = meas["local_energy"]
    for s, de, dl in zip(le["sigmas"], le["delta_error"], le["delta_loss"]):
        rec[f"local_energy_error_s{s:g}"] = de
        rec[f"local_energy_loss_s{s:g}"] = dl
    if "hessian_trace" in meas:
        rec["hessian_trace"] = meas["hessian_trace"]["estimate"]
    if "free_entropy" in meas:
        rec["neg_free_entropy"] = -meas["free_entropy"]["estimate"]
    return rec


def _slug(point: Mapping[str, Any]) -> str:
    text = "-".join(f"{k}={v}" for k, v in point.items())
    return "".join(c if c.isalnum() or c in "=.-_" else "_" for c in text)[:80]


@dataclass
class StudyResult:
    """Per-network records, the correlation table and the report folder."""

    records: list[dict[str, Any]]
    correlations: list[dict[str, Any]]
    measures: list[str]
    out_dir: Path
    settings: dict[str, Any]
    #: the generalization targets (the others in ``correlations`` are cross-checks)
    targets: tuple[str, ...] = TARGETS


def correlation_study(
    out_dir: str | Path,
    grid: str | os.PathLike | Mapping[str, Any],
    *,
    overrides: dict[str, Any] | None = None,
    free_entropy: bool | None = None,
    n_boot: int | None = None,
    progress: bool = False,
    write: bool = True,
    executor: Any = None,
) -> StudyResult:
    """Train every grid point, measure flatness, and correlate it with generalization.

    Args:
        out_dir: report folder; networks in ``out_dir/runs/NNN-SLUG``.
        grid: a study grid file or mapping (see the module docstring).
        overrides: TrainConfig keys applied to every network (e.g. ``data``), after ``base``
            and before the grid point.
        free_entropy: measure ``Phi`` (``True``), never (``False``), or ``None``: the grid's
            ``measure.free_entropy`` (``auto``: networks with at most ``free_entropy_max_params``
            parameters).
        n_boot: bootstrap resamples (default: the grid's ``n_boot`` or 1000).
        progress: tqdm bar over networks.
        write: write report.md, CSVs and PNGs.
        executor: where the networks train (:mod:`flatminima.studies.executors`; default:
            this process); measurements are made here afterwards.

    Returns:
        A :class:`StudyResult`.

    Raises:
        ValueError: a bad grid or config value (before training starts).
        FileNotFoundError: the grid file does not exist.
    """
    spec = load_study_grid(grid)
    points = study_points(spec)
    over = dict(overrides or {})
    over.setdefault("progress", False)
    configs = [TrainConfig.from_dict({**spec["base"], **over, **p}) for p in points]
    m = spec["measure"]
    fe_mode = m.get("free_entropy", "auto") if free_entropy is None else free_entropy
    if fe_mode not in (True, False, "auto"):
        raise ValueError(f"Invalid free_entropy {fe_mode!r}: true, false or auto")
    fe_max = int(m.get("free_entropy_max_params", 5000))
    fe_opts = {**DEFAULT_FREE_ENTROPY, **(m.get("free_entropy_options") or {})}
    _check_free_entropy_options(fe_opts)
    base_settings = MeasureSettings(
        sigmas=[float(s) for s in m.get("sigmas", [0.05, 0.1, 0.2, 0.3, 0.5])],
        n_draws=int(m.get("n_draws", 5)),
        n_samples=int(m.get("n_samples", 1000)),
        hessian_samples=int(m.get("hessian_samples", 10)),
    )
    base_settings.validate()
    n_boot = int(spec.get("n_boot", 1000) if n_boot is None else n_boot)
    out = Path(out_dir)
    dirs = [out / "runs" / f"{i:03d}-{_slug(p)}" for i, p in enumerate(points)]
    if executor is None:
        executor = SerialExecutor()
    executor.run(list(zip(dirs, configs)), progress=progress)
    data = DataCache()
    fe = (fe_mode, fe_max, fe_opts)
    records: list[dict[str, Any]] = []
    diverged: list[str] = []
    for i, (point, cfg, run_dir) in enumerate(zip(points, configs, dirs)):
        rec = _network_record(i, point, cfg, run_dir, data, base_settings, fe)
        if rec is None:
            diverged.append(str(run_dir))
        else:
            records.append(rec)
    if not records:
        raise RuntimeError(f"All {len(points)} networks diverged; lower the learning rates")
    measures = [k for k in records[0] if k.startswith("local_energy_")]
    measures += [k for k in ("hessian_trace", "neg_free_entropy") if any(k in r for r in records)]
    prereg = spec.get("preregistered")
    kept, excluded = _exclude(records, prereg)
    correlations = _correlate(kept, measures, prereg, n_boot)
    settings = {
        "grid": spec["grid"],
        "base": spec["base"],
        "overrides": over,
        "n_networks": len(records),
        "diverged": diverged,
        "n_boot": n_boot,
        "measure": {
            **base_settings.__dict__,
            "free_entropy": fe_mode,
            "free_entropy_options": fe_opts,
            "free_entropy_max_params": fe_max,
        },
        "description": spec.get("description", ""),
        "preregistered": prereg,
        "excluded": excluded,
        "n_variants": sum(c["target"] in TARGETS for c in correlations),
    }
    result = StudyResult(records, correlations, measures, out, settings)
    if write:
        write_study_report(result)
    return result
