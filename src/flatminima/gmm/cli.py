"""The ``flatminima gmm`` subcommand: sweep alpha, write CSV + figures, print a summary."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import sys

from flatminima.gmm.experiment import (
    DEFAULT_ESTIMATORS,
    ESTIMATORS,
    StudyConfig,
    as_float,
    config_dict,
    run_study,
    summarize,
    theory_curves,
)
from flatminima.gmm.replica import ERMTheory

__all__ = ["register", "run", "build_config"]

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


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``gmm`` parser to the top-level CLI's subparsers."""
    p = subparsers.add_parser(
        "gmm",
        help="Gaussian-mixture study: estimators vs the Bayes-optimal error, and flatness",
        description=__doc__,
    )
    p.add_argument("--n-features", type=int, default=1000, help="N (default 1000)")
    p.add_argument("--alphas", type=_floats, default=[0.5, 1, 2, 4, 8], help='e.g. "0.5,1,2,4,8"')
    p.add_argument("--delta", type=float, default=1.0, help="noise variance Delta")
    p.add_argument("--rho", type=float, default=0.5, help="fraction of +1 labels")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2, 3, 4], help='e.g. "0,1,2,3,4"')
    p.add_argument(
        "--estimators",
        type=lambda s: [t for t in s.split(",") if t],
        default=list(DEFAULT_ESTIMATORS),
        help=f"subset of: {','.join(ESTIMATORS)}",
    )
    p.add_argument(
        "--epochs",
        type=float,
        default=40.0,
        help="budget of every dynamical estimator in gradient evaluations / P (all replicas)",
    )
    p.add_argument(
        "--free-entropy",
        action="store_true",
        help="also measure the local free entropy of every estimator (about 1-3 s per fit at "
        "N=1000)",
    )
    p.add_argument(
        "--no-theory",
        action="store_true",
        help="skip the replica-theory ERM learning curves (theory.csv, lines in the figure)",
    )
    p.add_argument("--out", default="runs/gmm", help="output folder (resumable)")
    p.add_argument("--quick", action="store_true", help="tiny preset for tests/CI (seconds)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> StudyConfig:
    """The :class:`StudyConfig` of parsed arguments (``--quick`` overrides sizes)."""
    cfg = StudyConfig(
        n_features=args.n_features,
        alphas=tuple(args.alphas),
        delta=args.delta,
        rho=args.rho,
        seeds=tuple(args.seeds),
        estimators=tuple(args.estimators),
        epochs=args.epochs,
        free_entropy=args.free_entropy,
    )
    if args.quick:
        cfg.n_features, cfg.alphas, cfg.seeds, cfg.epochs = 100, (1.0, 4.0), (0,), 3.0
    return cfg


def _table(summary: list[dict[str, object]]) -> str:
    lines = [
        f"{'estimator':<16}{'stop':<7}{'alpha':>6}{'eps_g %':>15}{'gap_BO pp':>14}"
        f"{'gap_Heb pp':>14}{'train %':>9}{'sigma*':>8}"
    ]
    for s in summary:
        f = {k: float(v) for k, v in s.items() if isinstance(v, int | float)}
        lines.append(
            f"{s['estimator']!s:<16}{s['stop']!s:<7}{f['alpha']:>6g}"
            f"{100 * f['eps_g']:>8.2f}±{100 * f['eps_g_se']:<5.2f}"
            f"{100 * f['gap_bo']:>8.2f}±{100 * f['gap_bo_se']:<5.2f}"
            f"{100 * f['gap_heb']:>8.2f}±{100 * f['gap_heb_se']:<5.2f}"
            f"{100 * f['train_error']:>9.1f}{f['sigma_star']:>8.3f}"
        )
    return "\n".join(lines)


def _write_theory(theory: dict[str, list[ERMTheory]], path: str) -> None:
    fields = ["estimator", "loss", "lam", "alpha", "delta", "rho", "eps_g", "train_error"]
    fields += ["train_loss", "m", "q", "b", "V", "converged"]
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
            lines.append(
                f"{name:<16}{a:>6g}{100 * th.eps_g:>9.2f}"
                f"{100 * float(s['eps_g']):>9.2f}±{100 * float(s['eps_g_se']):<6.2f}"  # type: ignore[arg-type]
                f"{100 * th.train_error:>8.1f}/{100 * float(s['train_error']):<6.1f}"  # type: ignore[arg-type]
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run (or resume) the study into ``args.out``; returns the exit code."""
    try:
        cfg = build_config(args)
        cfg.validate()
    except ValueError as e:
        print(f"flatminima gmm: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config_dict(cfg), f, indent=2)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        def progress(it, total):  # type: ignore[no-untyped-def]
            return tqdm(it, total=total, desc="gmm cells", unit="cell")

    try:
        rows = run_study(cfg, os.path.join(args.out, "results.csv"), progress)
    except ValueError as e:
        print(f"flatminima gmm: error: {e}", file=sys.stderr)
        return 2
    summary = summarize(rows)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    from flatminima.gmm.plots import plot_eps_vs_alpha, plot_flatness_vs_eps

    theory = {} if args.no_theory else theory_curves(cfg)
    if theory:
        _write_theory(theory, os.path.join(args.out, "theory.csv"))
    plot_eps_vs_alpha(
        summary, cfg.delta, cfg.rho, os.path.join(args.out, "eps_vs_alpha.png"), theory
    )
    from flatminima.gmm.ranking import FLATNESS_MEASURES, kendall_by_alpha

    measured = [
        m for m in FLATNESS_MEASURES if any(math.isfinite(as_float(r.get(m))) for r in rows)
    ]
    taus = {m: kendall_by_alpha(rows, m) for m in measured}
    with open(os.path.join(args.out, "kendall.json"), "w") as f:
        json.dump(taus, f, indent=1)
    plot_flatness_vs_eps(rows, os.path.join(args.out, "flatness_vs_eps.png"), taus)
    print(_table(summary))
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
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m flatminima.gmm.cli``)."""
    parser = argparse.ArgumentParser(prog="flatminima")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
