"""Gaussian-mixture study: every estimator (closed forms, ridge ERM, and SGD / Replicated-SGD /
Entropy-SGD on the linear model, with the library's updates) on the same training sets, over
alpha = P/N; exact test errors against the Bayes-optimal one, flatness, replica theory. Writes
results.csv (resumable per cell), summary.json, kendall.json, theory.csv and two figures."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable

from flatminima.gmm.experiment import (
    ESTIMATORS,
    StudyConfig,
    as_float,
    config_dict,
    default_estimators,
    run_study,
    summarize,
    theory_curves,
)
from flatminima.gmm.replica import ERMTheory

__all__ = ["register", "run", "build_config", "resolve"]

log = logging.getLogger(__name__)


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


#: defaults without --quick / with --quick, for the flags --quick sets (a value the user gives
#: always wins)
DEFAULTS = dict(
    n_features=1000,
    alphas=[0.5, 1.0, 2.0, 4.0, 8.0],
    seeds=[0, 1, 2, 3, 4],
    epochs=40.0,
    theory_points=25,
    theory_max_iter=20000,
)
QUICK = dict(
    n_features=100,
    alphas=[1.0, 4.0],
    seeds=[0],
    epochs=3.0,
    theory_points=0,
    theory_max_iter=2000,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``gmm`` parser to the top-level CLI's subparsers."""
    p = subparsers.add_parser(
        "gmm",
        help="Gaussian-mixture study: estimators vs the Bayes-optimal error, and flatness",
        description=__doc__,
    )
    d, q = DEFAULTS, QUICK
    p.add_argument(
        "--n-features",
        type=int,
        default=None,
        metavar="N",
        help=f"dimension N (default {d['n_features']}; --quick: {q['n_features']})",
    )
    p.add_argument(
        "--alphas",
        type=_floats,
        default=None,
        metavar="A,A,...",
        help="sample ratios alpha = P/N, comma-separated (default 0.5,1,2,4,8; --quick: 1,4)",
    )
    p.add_argument("--delta", type=float, default=1.0, help="noise variance Delta (default 1)")
    p.add_argument(
        "--rho",
        type=float,
        default=0.5,
        help="fraction of +1 labels, in (0, 1) (default 0.5; any other value adds "
        "the finite-N Bayes-optimal classifier to the default estimators)",
    )
    p.add_argument(
        "--seeds",
        type=_ints,
        default=None,
        metavar="S,S,...",
        help="data seeds, comma-separated (default 0,1,2,3,4; --quick: 0)",
    )
    p.add_argument(
        "--estimators",
        type=lambda s: [t for t in s.split(",") if t],
        default=None,
        metavar="E,E,...",
        help=f"subset of: {','.join(ESTIMATORS)} (default: all but max_margin; "
        "bayes_optimal only when --rho is not 0.5)",
    )
    _add_budget_and_measures(p)
    p.add_argument("--out", default="runs/gmm", help="output folder (resumable; default runs/gmm)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small defaults for a smoke test (seconds): N=100, alphas 1,4, seed 0, "
        "3 epochs, theory at the study's alphas only; flags you give still apply",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _add_budget_and_measures(p: argparse.ArgumentParser) -> None:
    """The training budget, the flatness measures and the replica-theory flags."""
    d, q = DEFAULTS, QUICK
    p.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="budget of every dynamical estimator in gradient evaluations / P, all "
        f"replicas together (default {d['epochs']:g}; --quick: {q['epochs']:g})",
    )
    p.add_argument(
        "--free-entropy",
        action="store_true",
        help="also measure the local free entropy of every estimator (about 1-3 s "
        "per fit at N=1000)",
    )
    p.add_argument(
        "--no-theory",
        action="store_true",
        help="skip the replica-theory ERM learning curves (theory.csv, lines in the figure)",
    )
    p.add_argument(
        "--theory-points",
        type=int,
        default=None,
        metavar="K",
        help="replica-theory alphas added, log-spaced, to the study's own (default "
        f"{d['theory_points']}; --quick: {q['theory_points']})",
    )
    p.add_argument(
        "--theory-max-iter",
        type=int,
        default=None,
        metavar="IT",
        help="iteration cap of each replica fixed point; a point beyond it is marked "
        f"not converged (default {d['theory_max_iter']}; --quick: "
        f"{q['theory_max_iter']})",
    )


def resolve(args: argparse.Namespace) -> dict[str, object]:
    """The value of every flag ``--quick`` affects: the user's where given, else the quick or
    the normal default. Never replaces a value the user gave."""
    base = QUICK if args.quick else DEFAULTS
    return {k: getattr(args, k) if getattr(args, k) is not None else base[k] for k in DEFAULTS}


def build_config(args: argparse.Namespace) -> StudyConfig:
    """The :class:`StudyConfig` of parsed arguments (see :func:`resolve`)."""
    r = resolve(args)
    estimators = args.estimators if args.estimators is not None else default_estimators(args.rho)
    return StudyConfig(
        n_features=r["n_features"],  # type: ignore[arg-type]
        alphas=tuple(r["alphas"]),  # type: ignore[arg-type]
        delta=args.delta,
        rho=args.rho,
        seeds=tuple(r["seeds"]),  # type: ignore[arg-type]
        estimators=tuple(estimators),
        epochs=r["epochs"],  # type: ignore[arg-type]
        free_entropy=args.free_entropy,
    )


def _table(summary: list[dict[str, object]]) -> str:
    lines = [
        f"{'estimator':<18}{'stop':<7}{'alpha':>6}{'eps_g %':>15}{'gap_BO pp':>14}"
        f"{'gap_Bayes_N pp':>15}{'train %':>9}{'sigma*':>8}{'collapsed':>10}"
    ]
    for s in summary:
        f = {k: float(v) for k, v in s.items() if isinstance(v, int | float)}
        lines.append(
            f"{s['estimator']!s:<18}{s['stop']!s:<7}{f['alpha']:>6g}"
            f"{100 * f['eps_g']:>8.2f}±{100 * f['eps_g_se']:<5.2f}"
            f"{100 * f['gap_bo']:>8.2f}±{100 * f['gap_bo_se']:<5.2f}"
            f"{100 * f['gap_bayes']:>9.2f}±{100 * f['gap_bayes_se']:<5.2f}"
            f"{100 * f['train_error']:>9.1f}{f['sigma_star']:>8.3f}"
            + f"{int(f['n_collapsed'])}/{int(f['n'])}".rjust(10)
        )
    return "\n".join(lines)


def _write_theory(theory: dict[str, list[ERMTheory]], path: str) -> None:
    fields = ["estimator", "loss", "lam", "alpha", "delta", "rho", "eps_g", "train_error"]
    fields += ["train_loss", "m", "q", "b", "V", "iterations", "converged"]
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        wr.writeheader()
        for name, curve in theory.items():
            for r in curve:
                wr.writerow(dict(dataclasses.asdict(r), estimator=name))


def _theory_table(theory: dict[str, list[ERMTheory]], summary: list[dict[str, object]]) -> str:
    lines = [f"{'estimator':<16}{'alpha':>6}{'theory':>9}{'simulation':>16}{'train th/sim':>15}"]
    for name, curve in theory.items():
        for s in summary:
            if s["estimator"] != name:
                continue
            a = float(s["alpha"])  # type: ignore[arg-type]
            th = min(curve, key=lambda r: abs(r.alpha - a))
            nc = "" if th.converged else f"  (theory not converged in {th.iterations} iterations)"
            lines.append(
                f"{name:<16}{a:>6g}{100 * th.eps_g:>9.2f}"
                f"{100 * float(s['eps_g']):>9.2f}±{100 * float(s['eps_g_se']):<6.2f}"  # type: ignore[arg-type]
                f"{100 * th.train_error:>8.1f}/{100 * float(s['train_error']):<6.1f}{nc}"  # type: ignore[arg-type]
            )
    return "\n".join(lines)


def _validate(args: argparse.Namespace) -> StudyConfig:
    """The validated configuration (``ValueError`` naming the first bad value)."""
    r = resolve(args)
    for key, low in (("theory_points", 0), ("theory_max_iter", 1)):
        if r[key] < low:  # type: ignore[operator]
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"Invalid {flag} value: {r[key]!r} (expected an int >= {low})")
    cfg = build_config(args)
    if not (math.isfinite(cfg.delta) and cfg.delta > 0):
        raise ValueError(f"Invalid --delta value: {cfg.delta!r} (the noise variance must be > 0)")
    if not (isinstance(cfg.n_features, int) and cfg.n_features >= 2):
        raise ValueError(f"Invalid --n-features value: {cfg.n_features!r} (expected an int >= 2)")
    cfg.validate()
    return cfg


Cells = Iterable[tuple[float, int]]


def _progress(args: argparse.Namespace) -> Callable[[Cells, int], Cells] | None:
    if args.no_progress:
        return None
    from tqdm import tqdm

    def progress(it: Cells, total: int) -> Cells:
        return tqdm(it, total=total, desc="gmm cells", unit="cell")

    return progress


Rows = list[dict[str, object]]
Taus = dict[str, list[dict[str, float]]]


def _figures_and_ranks(
    args: argparse.Namespace,
    cfg: StudyConfig,
    rows: Rows,
    summary: Rows,
    theory: dict[str, list[ERMTheory]],
) -> Taus:
    """theory.csv, the two figures and kendall.json; returns the Kendall taus."""
    from flatminima.gmm.plots import plot_eps_vs_alpha, plot_flatness_vs_eps
    from flatminima.gmm.ranking import FLATNESS_MEASURES, kendall_by_alpha

    if theory:
        _write_theory(theory, os.path.join(args.out, "theory.csv"))
    drawn = {k: [r for r in c if r.converged] for k, c in theory.items()}
    plot_eps_vs_alpha(
        summary, cfg.delta, cfg.rho, os.path.join(args.out, "eps_vs_alpha.png"), drawn
    )
    measured = [
        m for m in FLATNESS_MEASURES if any(math.isfinite(as_float(r.get(m))) for r in rows)
    ]
    taus = {m: kendall_by_alpha(rows, m) for m in measured}
    with open(os.path.join(args.out, "kendall.json"), "w") as f:
        json.dump(taus, f, indent=1)
    plot_flatness_vs_eps(rows, os.path.join(args.out, "flatness_vs_eps.png"), taus)
    return taus


def _report(
    args: argparse.Namespace,
    rows: Rows,
    summary: Rows,
    theory: dict[str, list[ERMTheory]],
    taus: Taus,
) -> None:
    print(_table(summary))
    collapsed = [r for r in rows if as_float(r.get("collapsed")) == 1.0]
    if collapsed:
        print(
            f"\n{len(collapsed)} collapsed fit(s) (training error at chance or no finite "
            "weights; left out of the Kendall taus):"
        )
        for r in collapsed:
            print(
                f"  {r['estimator']} ({r['stop']}) alpha={as_float(r['alpha']):g} "
                f"seed={int(as_float(r['seed']))} train error={as_float(r['train_error']):.3f}"
            )
    if theory:
        print("\nReplica theory (N -> infinity) beside the simulations, eps_g %:")
        print(_theory_table(theory, summary))
    for m, res in taus.items():
        print(f"\nKendall tau({m} oriented flatter-larger, eps_g), 95% bootstrap CI over seeds:")
        for d in res:
            print(f"  alpha={d['alpha']:g}: {d['tau']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]")
    extra = ", theory.csv" if theory else ""
    print(
        f"\nwrote {args.out}/results.csv, summary.json{extra}, eps_vs_alpha.png, "
        "flatness_vs_eps.png"
    )


def run(args: argparse.Namespace) -> int:
    """Run (or resume) the study into ``args.out``; returns the exit code (2: bad input)."""
    try:
        cfg = _validate(args)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(config_dict(cfg), f, indent=2)
        rows = run_study(cfg, os.path.join(args.out, "results.csv"), _progress(args))
    except ValueError as e:
        print(f"flatminima gmm: error: {e}", file=sys.stderr)
        return 2
    summary = summarize(rows)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    r = resolve(args)
    theory = (
        {}
        if args.no_theory
        else theory_curves(
            cfg,
            int(r["theory_points"]),  # type: ignore[call-overload]
            int(r["theory_max_iter"]),  # type: ignore[call-overload]
        )
    )
    taus = _figures_and_ranks(args, cfg, rows, summary, theory)
    _report(args, rows, summary, theory, taus)
    return 0
