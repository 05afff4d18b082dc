"""``flatminima flatness RUN_DIR...``: measure the flatness of finished runs.

Writes ``flatness/local_energy.csv`` and ``flatness/local_energy.png`` (delta E against sigma)
into each run folder (or ``--out``), plus ``hessian.json`` with ``--hessian``, and prints a table.
Every CSV row carries the run's status and its training error at the last evaluation point
(``run_status``, ``train_error``) and, with ``--hessian``, the Hessian columns of the measured
model (``hessian_top``, ``hessian_trace``, ``hessian_trace_se``).

Only a *complete* run is a minimum to measure: a run that diverged, was interrupted or is still
training is refused (exit status 1, one line naming the run and its status) unless
``--allow-incomplete`` is given.

The work is done by :mod:`flatminima.train.measure`; this module parses the flags and prints
the tables.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from flatminima._table import format_table
from flatminima.train.measure import (
    FlatnessOptions,
    check_runs,
    flatness_dir,
    measure_run_flatness,
)


def _floats(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated finite numbers >= 0 (at least one), got {text!r}"
        )
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "flatness",
        help="measure local energy (and Hessian) of finished runs",
        description="Local energy delta_E(sigma): the train-error/loss increase under random "
        "multiplicative weight noise w*(1+sigma*xi), on the run's training data. Only complete "
        "runs are measured unless --allow-incomplete.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run folders written by `flatminima train`",
    )
    p.add_argument(
        "--sigmas",
        type=_floats,
        default=[0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5],
        help="noise strengths (default 0,0.05,0.1,0.2,0.3,0.4,0.5)",
    )
    p.add_argument(
        "--draws", type=_positive_int, default=10, help="noise draws per sigma (default 10)"
    )
    p.add_argument(
        "--samples",
        type=_positive_int,
        default=5000,
        help="first training samples measured (default 5000)",
    )
    p.add_argument(
        "--noise",
        choices=("multiplicative", "additive"),
        default="multiplicative",
        help="w*(1+sigma*xi) (default) or w+sigma*xi",
    )
    p.add_argument(
        "--bn",
        choices=("eval", "recalibrate"),
        default="eval",
        help="BatchNorm statistics of the perturbed network: the stored ones (eval, "
        "default) or recomputed on the measured samples",
    )
    p.add_argument(
        "--all-models",
        action="store_true",
        help="for rSGD runs also measure every replica, not only the centre",
    )
    p.add_argument(
        "--hessian",
        action="store_true",
        help="also the top Hessian eigenvalue (Lanczos) and trace (Hutchinson)",
    )
    p.add_argument(
        "--hessian-samples",
        type=_positive_int,
        default=1000,
        help="first training samples for the Hessian measures (default 1000)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws (default 0)")
    p.add_argument("--device", default=None, help="device (default: the run's)")
    p.add_argument(
        "--out", type=Path, default=None, help="write results here instead of RUN_DIR/flatness"
    )
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="also measure runs that diverged, were interrupted or are still training",
    )
    p.set_defaults(func=run)


def options(args: argparse.Namespace) -> FlatnessOptions:
    """The measurement options given on the command line."""
    return FlatnessOptions(
        sigmas=tuple(args.sigmas),
        draws=args.draws,
        samples=args.samples,
        noise=args.noise,
        bn=args.bn,
        all_models=args.all_models,
        hessian=args.hessian,
        hessian_samples=args.hessian_samples,
        seed=args.seed,
        device=args.device,
        out=args.out,
    )


def run(args: argparse.Namespace) -> int:
    statuses = check_runs(args.runs, args.allow_incomplete)
    opts = options(args)
    for run_dir in args.runs:
        rows = measure_run_flatness(run_dir, statuses[run_dir], opts)
        cols = ["model", "sigma", "delta_error", "delta_error_se", "delta_loss", "delta_loss_se"]
        cols += [c for c in ("hessian_top", "hessian_trace") if c in rows[0]]
        note = "" if statuses[run_dir] == "complete" else f", status {statuses[run_dir]}"
        print(
            f"{run_dir} (base train error {rows[0]['base_error']:.4f}, "
            f"{rows[0]['n_samples']} samples, {rows[0]['n_draws']} draws{note})"
        )
        print(format_table(rows, cols))
        where = flatness_dir(run_dir, args.out)
        print(f"wrote {where}/local_energy.csv and local_energy.png\n")
    return 0
