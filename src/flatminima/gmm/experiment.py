"""The Gaussian-mixture study: every estimator on the same data, eps_g against alpha, flatness.

One *cell* is ``(N, Delta, rho, alpha, seed)``: one training set, on which every estimator is
fitted. Its test error is the exact ``eps_g`` of :mod:`flatminima.gmm.theory` (computed with the
true centre ``v``, which no estimator or stopping rule sees). Gaps are paired on the same data:
``gap_heb = eps_g - eps_g(Hebbian)`` and ``gap_bayes = eps_g - eps_g(finite-N Bayes-optimal
classifier)``, which differ only when ``rho != 0.5`` (the Hebbian has no bias and is then not
Bayes-optimal); ``gap_bo`` is to the N -> infinity Bayes-optimal error. When ``rho != 0.5``
every estimator but the Hebbian fits a bias (ERM, the finite-N Bayes classifier and the
dynamics). A fit at chance (training error within 2 SE of 1/2, or of the minority fraction for
a fit with a bias) or without finite non-zero weights is flagged ``collapsed``.

Stopping rules (training data only):

- ``final``: the last iterate of the full budget ("converged").
- ``val``: a run on 80 % of the training set picks the checkpoint with the lowest error on the
  other 20 % (earliest on ties); the estimator is the checkpoint at the same epoch of the run on
  the full training set (same seed and hyperparameters).

Flatness columns: ``local_energy`` ``delta_E(w, sigma)`` at ``sigma = local_energy_sigma``
(raw), and ``sigma_star``, the multiplicative noise at which the expected training error reaches
the cell's common target ``max_k E_train,k + 0.05`` (matched error; larger = flatter), and the
angle to the Hebbian direction.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from flatminima.gmm.data import check_model_args, sample
from flatminima.gmm.estimators import bayes_optimal, erm_hinge, erm_logistic, erm_square, hebbian
from flatminima.gmm.fastdyn import run_grid
from flatminima.gmm.flatness import angle_deg, local_energy, sigma_at_error, training_error
from flatminima.gmm.free_entropy import DEFAULT_BETA, DEFAULT_GAMMA, local_free_entropy
from flatminima.gmm.replica import ERMTheory, erm_learning_curve
from flatminima.gmm.theory import bayes_optimal_error, classifier_error, overlaps

__all__ = [
    "StudyConfig",
    "ESTIMATORS",
    "DYNAMICS",
    "run_cell",
    "run_study",
    "read_rows",
    "summarize",
    "CSV_FIELDS",
    "Fit",
    "collapse_threshold",
    "default_estimators",
    "THEORY_ESTIMATORS",
    "theory_curves",
]

log = logging.getLogger(__name__)

RIDGE = 1e-4
CLOSED = ("hebbian", "bayes_optimal", "square_ridge", "logistic_ridge", "hinge_ridge", "max_margin")
#: the coupling cap (fastdyn's ``max_lr_gamma``) of the scoped rSGD variants, whose gamma_t
#: grows x1000 over training; every other dynamical estimator runs the library's update as is
SCOPED_MAX_LR_GAMMA = 1.0

_LR6 = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_LR2 = (0.2, 1.0)
_GAMMA = (0.03, 0.3, 3.0)
_GAMMA0_SCOPED = (0.003, 0.03, 0.3)
_TEMP1 = (0.02, 0.1)


def _g(**axes: Sequence[float]) -> list[dict[str, float]]:
    out: list[dict[str, float]] = [{}]
    for key, vals in axes.items():
        out = [dict(d, **{key: float(v)}) for d in out for v in vals]
    return out


# name -> (algorithm, objective, scoped, grid). Same number of trials per objective for every
# algorithm (6 on the loss, 12 on the error-counting classifier); chosen on validation error.
DYNAMICS: dict[str, tuple[str, str, bool, list[dict[str, float]]]] = {
    "sgd_loss": ("sgd", "logistic", False, _g(lr=_LR6)),
    "avg_loss": ("rsgd", "logistic", False, _g(lr=_LR6, gamma=(0.0,))),
    "rsgd_loss": ("rsgd", "logistic", False, _g(gamma=_GAMMA, lr=_LR2)),
    "rsgd_scoped_loss": ("rsgd", "logistic", True, _g(gamma=_GAMMA0_SCOPED, lr=_LR2)),
    "esgd_loss": ("esgd", "logistic", False, _g(gamma=_GAMMA, lr=_LR2)),
    "sgd_err": ("sgd", "error", False, _g(lr=_LR6, temp1=_TEMP1)),
    "avg_err": ("rsgd", "error", False, _g(lr=_LR6, temp1=_TEMP1, gamma=(0.0,))),
    "rsgd_err": ("rsgd", "error", False, _g(gamma=_GAMMA, lr=_LR2, temp1=_TEMP1)),
    "rsgd_scoped_err": ("rsgd", "error", True, _g(gamma=_GAMMA0_SCOPED, lr=_LR2, temp1=_TEMP1)),
    "esgd_err": ("esgd", "error", False, _g(gamma=_GAMMA, lr=_LR2, temp1=_TEMP1)),
}
ESTIMATORS = CLOSED + tuple(DYNAMICS)
DEFAULT_ESTIMATORS = ("hebbian", "square_ridge", "logistic_ridge", "hinge_ridge") + tuple(DYNAMICS)
CSV_FIELDS = [
    "n_features",
    "delta",
    "rho",
    "alpha",
    "seed",
    "estimator",
    "stop",
    "eps_g",
    "eps_bo",
    "gap_bo",
    "gap_heb",
    "gap_bayes",
    "train_error",
    "collapsed",
    "local_energy",
    "sigma_star",
    "free_entropy",
    "free_entropy_se",
    "angle_heb",
    "m",
    "q",
    "stop_epoch",
    "grad_evals",
    "hparams",
]


class Fit(NamedTuple):
    """One fitted classifier of a cell: ``sign(w . x / sqrt(N) + b)`` and how it was chosen."""

    name: str
    stop: str
    w: np.ndarray
    b: float
    epoch: float
    grad_evals: int
    hparams: str


def default_estimators(rho: float) -> tuple[str, ...]:
    """The default estimators: the finite-N Bayes-optimal classifier is added when
    ``rho != 0.5`` (at 0.5 it is the Hebbian direction, a duplicate in the rankings)."""
    return DEFAULT_ESTIMATORS + (("bayes_optimal",) if rho != 0.5 else ())


@dataclass
class StudyConfig:
    """A sweep: every ``alpha`` x ``seed`` cell at fixed ``N, Delta, rho``.

    ``epochs`` is the budget of the dynamical estimators in gradient evaluations per sample
    (all replicas together: SGD, rSGD and eSGD get the same number).
    """

    n_features: int = 1000
    alphas: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0)
    delta: float = 1.0
    rho: float = 0.5
    seeds: Sequence[int] = (0, 1, 2, 3, 4)
    estimators: Sequence[str] = DEFAULT_ESTIMATORS
    epochs: float = 40.0
    num_replicas: int = 3
    val_fraction: float = 0.2
    local_energy_sigma: float = 0.5
    free_entropy: bool = False
    free_entropy_gamma: float = DEFAULT_GAMMA
    free_entropy_beta: float = DEFAULT_BETA

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if not isinstance(self.n_features, int) or self.n_features < 2:
            raise ValueError(f"Invalid n_features value: {self.n_features!r} (expected >= 2)")
        check_model_args(self.delta, self.rho)
        if not self.alphas or any(not (0 < a < math.inf) for a in self.alphas):
            raise ValueError(f"Invalid alphas: {list(self.alphas)!r} (expected finite values > 0)")
        if not self.seeds or any(int(s) < 0 for s in self.seeds):
            raise ValueError(f"Invalid seeds: {list(self.seeds)!r} (expected ints >= 0)")
        bad = [e for e in self.estimators if e not in ESTIMATORS]
        if bad or not self.estimators:
            raise ValueError(f"Invalid estimators: {bad or '[]'} (valid: {', '.join(ESTIMATORS)})")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"Invalid val_fraction value: {self.val_fraction!r} (in (0, 1))")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"Invalid epochs value: {self.epochs!r} (expected > 0)")
        for key in ("free_entropy_gamma", "free_entropy_beta"):
            val = getattr(self, key)
            if not (isinstance(val, int | float) and math.isfinite(val) and val > 0):
                raise ValueError(f"Invalid {key} value: {val!r} (expected > 0)")


def _fit_dynamics(
    cfg: StudyConfig,
    name: str,
    X: np.ndarray,
    y: np.ndarray,
    trn: np.ndarray,
    val: np.ndarray,
    seed: int,
) -> list[tuple[str, np.ndarray, float, float, int, str]]:
    """Tune on (trn, val), refit the chosen configurations on all of (X, y).

    The linear model has a bias iff ``rho != 0.5`` (as the ERM estimators). Returns
    ``(stop, w, b, epoch, grad_evals, hparams)`` for ``stop`` in ``val`` (configuration
    and checkpoint jointly minimising the validation error, earliest on ties) and ``final``
    (configuration minimising the validation error at the end of the budget). A checkpoint
    whose weights are not finite (a diverged configuration) is never chosen; if every one is,
    the returned ``w`` is not finite and the fit is reported as collapsed.
    """
    alg, obj, scoped, grid = DYNAMICS[name]
    kw = dict(
        epochs=cfg.epochs,
        num_replicas=cfg.num_replicas,
        scoped=scoped,
        seed=seed,
        max_lr_gamma=SCOPED_MAX_LR_GAMMA if scoped else None,
        fit_intercept=cfg.rho != 0.5,
    )
    tune = run_grid(X[trn], y[trn], alg, obj, grid, **kw)  # type: ignore[arg-type]
    n = X.shape[1]
    with np.errstate(all="ignore"):
        h = np.einsum("ckn,vn->ckv", tune.w, X[val] / math.sqrt(n)) + tune.b[..., None]
        h *= y[val]
        ok = np.isfinite(tune.w).all(-1) & np.isfinite(tune.b)
    val_err = np.where(ok, (h <= 0).mean(-1), np.inf)  # [C, K]
    c_val, k_val = np.unravel_index(int(np.argmin(val_err)), val_err.shape)
    k_fin = int(np.argmin(val_err[-1]))
    chosen = sorted({int(k_val), k_fin})
    full = run_grid(X, y, alg, obj, [grid[k] for k in chosen], **kw)  # type: ignore[arg-type]
    out = []
    for stop, k, c in (("val", int(k_val), int(c_val)), ("final", k_fin, -1)):
        j = chosen.index(k)
        hp = " ".join(f"{key}={val:g}" for key, val in grid[k].items())
        out.append(
            (stop, full.w[c, j], float(full.b[c, j]), float(full.epochs[c]), full.grad_evals, hp)
        )
    return out


def _closed_form(cfg: StudyConfig, name: str, X: np.ndarray, y: np.ndarray) -> Fit | None:
    """The closed-form / convex estimator ``name`` (None: max-margin on non-separable data)."""
    fit_b = cfg.rho != 0.5
    if name == "hebbian":
        c = hebbian(X, y)
    elif name == "bayes_optimal":
        c = bayes_optimal(X, y, cfg.delta, cfg.rho)
    elif name == "square_ridge":
        c = erm_square(X, y, RIDGE, fit_b)
    elif name == "logistic_ridge":
        c = erm_logistic(X, y, RIDGE, fit_b)
    elif name == "hinge_ridge":
        c = erm_hinge(X, y, RIDGE, fit_b)
    else:  # max_margin
        try:
            c = erm_hinge(X, y, 0.0, fit_b)
        except ValueError:
            return None  # not separable: the max-margin estimator does not exist
    hp = f"lam={RIDGE:g}" if "ridge" in name else ""
    return Fit(name, "closed", c.w, c.b, float("nan"), 0, hp)


def _fits(cfg: StudyConfig, X: np.ndarray, y: np.ndarray, seed: int) -> list[Fit]:
    """Every estimator of ``cfg`` fitted on ``(X, y)`` (dynamics: both stopping rules)."""
    p = X.shape[0]
    perm = np.random.default_rng([seed, 7]).permutation(p)
    n_val = max(1, round(cfg.val_fraction * p))
    val, trn = perm[:n_val], perm[n_val:]
    fits: list[Fit] = []
    for name in cfg.estimators:
        if name in DYNAMICS:
            for stop, w, b, ep, ge, hp in _fit_dynamics(cfg, name, X, y, trn, val, seed):
                fits.append(Fit(name, stop, w, b, ep, ge, hp))
        else:
            fit = _closed_form(cfg, name, X, y)
            if fit is not None:
                fits.append(fit)
    return fits


def collapse_threshold(p: int, chance: float = 0.5) -> float:
    """Training error from which a fit counts as collapsed: within 2 binomial SE of the error
    at chance, ``chance - 2 sqrt(chance (1 - chance) / P)``. ``chance`` is 1/2 for a classifier
    without bias (a direction orthogonal to ``v`` errs on half the points whatever ``rho``) and
    the minority fraction of the training labels for one with a bias (which can always predict
    the majority label)."""
    return chance - 2.0 * math.sqrt(chance * (1.0 - chance) / p)


def _has_bias(cfg: StudyConfig, name: str) -> bool:
    """Whether estimator ``name`` fits a bias: every one but the Hebbian when ``rho != 0.5``
    (the finite-N Bayes classifier's bias is 0 at ``rho = 0.5``)."""
    return cfg.rho != 0.5 and name != "hebbian"


def _is_degenerate(w: np.ndarray, b: float = 0.0) -> bool:
    """Weights that define no usable classifier: not finite, zero, or a squared norm that
    overflows (a diverged run); or a non-finite bias."""
    with np.errstate(all="ignore"):
        bad_w = not np.isfinite(w).all() or not 0 < float(w @ w) < math.inf
    return bad_w or not math.isfinite(b)


def _flatness(
    cfg: StudyConfig, f: Fit, X: np.ndarray, y: np.ndarray, target: float, seed: int
) -> dict[str, float]:
    """Flatness columns of one fit (nan for degenerate weights)."""
    nan = float("nan")
    out = dict(local_energy=nan, sigma_star=nan, free_entropy=nan, free_entropy_se=nan)
    if _is_degenerate(f.w, f.b):
        return out
    out["local_energy"] = local_energy(f.w, f.b, X, y, cfg.local_energy_sigma)
    out["sigma_star"] = sigma_at_error(f.w, f.b, X, y, target)
    if cfg.free_entropy:
        fe = local_free_entropy(
            f.w, f.b, X, y, gamma=cfg.free_entropy_gamma, beta=cfg.free_entropy_beta, seed=seed
        )
        out["free_entropy"], out["free_entropy_se"] = fe.phi, fe.phi_se
    return out


def run_cell(cfg: StudyConfig, alpha: float, seed: int) -> list[dict[str, object]]:
    """Fit every estimator of ``cfg`` on one training set; return one row per (estimator, stop).

    ``gap_bayes`` is paired to the finite-N Bayes-optimal classifier
    (:func:`flatminima.gmm.estimators.bayes_optimal`, with its bias) on the same data, which is
    the Hebbian direction with ``b = 0`` when ``rho = 0.5`` (then ``gap_bayes = gap_heb``).
    A fit is ``collapsed`` when its weights are not finite or zero (``eps_g`` and the flatness
    columns are then empty) or its training error is at chance (:func:`collapse_threshold`:
    1/2 without a bias, the minority label fraction with one).
    """
    X, y, v = sample(cfg.n_features, alpha, cfg.delta, cfg.rho, seed=seed)
    fits = _fits(cfg, X, y, seed)
    eps_bo = bayes_optimal_error(alpha, cfg.delta, cfg.rho)
    w_heb = hebbian(X, y).w
    eps_heb = classifier_error(w_heb, 0.0, v, cfg.delta, cfg.rho)
    bo = bayes_optimal(X, y, cfg.delta, cfg.rho)
    eps_bayes = classifier_error(bo.w, bo.b, v, cfg.delta, cfg.rho)
    nan = float("nan")
    train_errs = [nan if _is_degenerate(f.w, f.b) else training_error(f.w, f.b, X, y) for f in fits]
    minority = float(min(np.mean(y > 0), np.mean(y < 0)))
    chance = [collapse_threshold(len(y), minority if _has_bias(cfg, f.name) else 0.5) for f in fits]
    collapsed_fits = [not tr < c for tr, c in zip(train_errs, chance)]  # nan (degenerate) too
    kept = [tr for tr, c in zip(train_errs, collapsed_fits) if not c]
    target = min(0.45, max(kept, default=0.0) + 0.05)  # matched error of the non-collapsed fits
    rows = []
    for f, tr, collapsed in zip(fits, train_errs, collapsed_fits):
        degenerate = _is_degenerate(f.w, f.b)
        eps = nan if degenerate else classifier_error(f.w, f.b, v, cfg.delta, cfg.rho)
        m, q = (nan, nan) if degenerate else overlaps(f.w, v)
        if collapsed:
            log.warning(
                "collapsed fit: %s (%s) at alpha=%g, seed=%d (train error %.3f)",
                f.name,
                f.stop,
                alpha,
                seed,
                tr,
            )
        rows.append(
            dict(
                n_features=cfg.n_features,
                delta=cfg.delta,
                rho=cfg.rho,
                alpha=alpha,
                seed=seed,
                estimator=f.name,
                stop=f.stop,
                eps_g=eps,
                eps_bo=eps_bo,
                gap_bo=eps - eps_bo,
                gap_heb=eps - eps_heb,
                gap_bayes=eps - eps_bayes,
                train_error=tr,
                collapsed=int(collapsed),
                **_flatness(cfg, f, X, y, target, seed),
                angle_heb=nan if degenerate else angle_deg(f.w, w_heb),
                m=m,
                q=q,
                stop_epoch=f.epoch,
                grad_evals=f.grad_evals,
                hparams=f.hparams,
            )
        )
    return rows


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, object]]:
    """Rows of a study CSV with numbers parsed (empty list if the file does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        out = []
        for r in csv.DictReader(f):
            row: dict[str, object] = {}
            for k, val in r.items():
                try:
                    row[k] = float(val) if k not in ("estimator", "stop", "hparams") else val
                except ValueError:
                    row[k] = val
            out.append(row)
        return out


def as_float(val: object) -> float:
    """A CSV cell as a float (``nan`` for a missing column, an empty or a non-numeric cell)."""
    try:
        return float(val)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def _cell_key(n: float, delta: float, rho: float, alpha: float, seed: float) -> tuple:
    return (
        int(n),
        round(float(delta), 12),
        round(float(rho), 12),
        round(float(alpha), 12),
        int(seed),
    )


def run_study(
    cfg: StudyConfig,
    csv_path: str | os.PathLike[str],
    progress: Callable[[Iterable[tuple[float, int]], int], Iterable[tuple[float, int]]]
    | None = None,
) -> list[dict[str, object]]:
    """Run every missing cell, appending its rows to ``csv_path``; return all rows of ``cfg``.

    Resumable: cells whose ``(N, Delta, rho, alpha, seed)`` already has rows in the CSV are
    skipped. ``progress(iterable, total)`` may wrap the cell loop (e.g. ``tqdm``).

    Raises:
        ValueError: on a bad configuration.
    """
    cfg.validate()
    done = {
        _cell_key(r["n_features"], r["delta"], r["rho"], r["alpha"], r["seed"])  # type: ignore[arg-type]
        for r in read_rows(csv_path)
    }
    todo = [
        (float(a), int(s))
        for a in cfg.alphas
        for s in cfg.seeds
        if _cell_key(cfg.n_features, cfg.delta, cfg.rho, a, s) not in done
    ]
    log.info("%d cells to run, %d already done", len(todo), len(done))
    it: Iterable[tuple[float, int]] = progress(todo, len(todo)) if progress else todo
    new_file = not os.path.exists(csv_path)
    if todo and not new_file:  # rows are appended: the columns must match
        with open(csv_path, newline="") as f:
            header = next(csv.reader(f), [])
        if header and header != CSV_FIELDS:
            raise ValueError(
                f"Invalid results file {os.fspath(csv_path)!r}: its columns {header} are not "
                f"this version's {CSV_FIELDS}; write to a new --out folder"
            )
    for alpha, seed in it:
        rows = run_cell(cfg, alpha, seed)
        with open(csv_path, "a", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new_file:
                wr.writeheader()
                new_file = False
            wr.writerows(rows)
    keys = {
        _cell_key(cfg.n_features, cfg.delta, cfg.rho, a, s) for a in cfg.alphas for s in cfg.seeds
    }
    return [
        r
        for r in read_rows(csv_path)
        if _cell_key(r["n_features"], r["delta"], r["rho"], r["alpha"], r["seed"]) in keys  # type: ignore[arg-type]
    ]


_SUMMARY_KEYS = (
    "eps_g",
    "gap_bo",
    "gap_heb",
    "gap_bayes",
    "train_error",
    "local_energy",
    "sigma_star",
    "free_entropy",
    "angle_heb",
)


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the finite values (nan when there are none / one)."""
    x = x[np.isfinite(x)]
    mean = float(x.mean()) if x.size else float("nan")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    return mean, se


def summarize(rows: Sequence[dict[str, object]]) -> list[dict[str, object]]:
    """Mean and standard error per (estimator, stop, alpha) of eps_g, the gaps and flatness.

    ``n`` counts the fits, ``n_collapsed`` those flagged ``collapsed``; means are over the fits
    whose value is finite (a collapsed fit with finite weights is included, one without
    weights has no ``eps_g``). An empty group gives nan, never a warning.
    """
    groups: dict[tuple, list[dict[str, object]]] = {}
    for r in rows:
        groups.setdefault((r["estimator"], r["stop"], r["alpha"]), []).append(r)
    out = []
    for (name, stop, alpha), rs in groups.items():
        n_coll = sum(1 for r in rs if as_float(r.get("collapsed")) == 1.0)
        s: dict[str, object] = dict(
            estimator=name, stop=stop, alpha=alpha, n=len(rs), n_collapsed=n_coll
        )
        for k in _SUMMARY_KEYS:
            s[k], s[k + "_se"] = _mean_se(np.array([as_float(r.get(k)) for r in rs], dtype=float))
        out.append(s)
    order = {n: i for i, n in enumerate(ESTIMATORS)}
    out.sort(key=lambda s: (order.get(str(s["estimator"]), 99), str(s["stop"]), s["alpha"]))
    return out


# study estimator -> ERM loss of the replica theory (same ridge RIDGE; bias fitted iff rho != 0.5)
THEORY_ESTIMATORS = {
    "square_ridge": "square",
    "logistic_ridge": "logistic",
    "hinge_ridge": "hinge",
}


def theory_curves(
    cfg: StudyConfig, n_points: int = 25, max_iter: int = 20000
) -> dict[str, list[ERMTheory]]:
    """Replica-theory learning curves (:mod:`flatminima.gmm.replica`, N -> infinity) of the
    study's ridge-ERM estimators, at the study's alphas and ``n_points`` more log-spaced over
    their range (``n_points = 0``: the study's alphas only); each fixed point is capped at
    ``max_iter`` iterations (``converged=False`` beyond).

    Raises:
        ValueError: on ``n_points < 0`` or ``max_iter < 1``.
    """
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 0:
        raise ValueError(f"Invalid theory points value: {n_points!r} (expected an int >= 0)")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"Invalid theory max_iter value: {max_iter!r} (expected an int >= 1)")
    extra = np.geomspace(min(cfg.alphas), max(cfg.alphas), n_points).tolist() if n_points else []
    alphas = sorted(set(extra) | {float(a) for a in cfg.alphas})
    return {
        name: erm_learning_curve(loss, alphas, RIDGE, cfg.delta, cfg.rho, max_iter=max_iter)
        for name, loss in THEORY_ESTIMATORS.items()
        if name in cfg.estimators
    }


def config_dict(cfg: StudyConfig) -> dict[str, object]:
    """The resolved configuration (for saving beside the results)."""
    d = asdict(cfg)
    d["alphas"], d["seeds"], d["estimators"] = (
        list(cfg.alphas),
        list(cfg.seeds),
        list(cfg.estimators),
    )
    return d
