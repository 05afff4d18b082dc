"""``flatminima compare``, ``flatminima tune`` and ``flatminima study`` (tables printed here)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flatminima.train.config import parse_value

__all__ = ["register"]


def _floats(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid list {text!r}: expected comma-separated numbers, e.g. 0.05,0.1"
        ) from None


def _names(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        help="preset name (shipped in flatminima/presets/NAME.yaml, or ./configs/NAME.yaml)",
    )
    p.add_argument("--preset-file", type=Path, help="preset YAML file (common: + per-optimizer)")
    p.add_argument("--data", help="data set (overrides the preset)")
    p.add_argument("--model", help="model name (overrides the preset)")
    p.add_argument("--val-size", type=float, help="validation split (fraction or count)")
    p.add_argument("--train-subset", type=int, help="keep this many training samples")
    p.add_argument("--label-noise", type=float, help="fraction of training labels flipped")
    p.add_argument("--budget-epochs", type=float, help="budget in epochs (see --budget)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="override any TrainConfig key for every run (repeatable)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (resumable)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    over: dict[str, Any] = {}
    for flag, key in (
        ("data", "data"),
        ("model", "model"),
        ("val_size", "val_size"),
        ("train_subset", "train_subset"),
        ("label_noise", "label_noise"),
        ("budget_epochs", "epochs"),
        ("device", "device"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            over[key] = value
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"Invalid --set {item!r}: expected KEY=VALUE")
        key, val = item.split("=", 1)
        over[key.strip().replace("-", "_")] = parse_value(val)
    return over


def _preset(args: argparse.Namespace) -> Any:
    from flatminima.studies.presets import load_preset

    if args.preset and args.preset_file:
        raise ValueError("Give either --preset or --preset-file, not both")
    source = args.preset_file or args.preset
    return load_preset(source) if source else None


def register(subparsers: Any) -> None:
    """Add the ``compare``, ``tune`` and ``study`` subcommands."""
    p = subparsers.add_parser(
        "compare",
        help="compare optimizers over paired seeds at equal budget, with flatness",
        description="Train every (optimizer, seed) at equal gradient evaluations (default) or "
        "equal epochs per replica, measure the local energy of each final network, and write "
        "a report folder (report.md, results.json/CSV, PNG plots). Re-running skips finished "
        "runs and cached measurements.",
    )
    _add_common(p)
    p.add_argument(
        "--optimizers",
        type=_names,
        help="comma-separated optimizers or preset arms (default sgd,esgd,rsgd,sam)",
    )
    p.add_argument("--seeds", type=int, help="number of paired seeds (default 3)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="training processes at once, each with cores/jobs threads (default 1)",
    )
    p.add_argument(
        "--budget",
        choices=["grad-evals", "equal-grad-evals", "epochs", "equal-epochs", "both"],
        help="equal gradient evaluations (default), equal epochs per replica, or both",
    )
    p.add_argument(
        "--sigmas", type=_floats, help="local-energy noise strengths (default 0.05,0.1,0.2,0.3,0.5)"
    )
    p.add_argument("--flatness-draws", type=int, help="noise draws per sigma (default 5)")
    p.add_argument(
        "--flatness-samples",
        type=int,
        help="fixed training subset for the local energy (default 2000)",
    )
    p.add_argument(
        "--large-batch",
        action="store_true",
        default=None,
        help="add SGD with batch y*B as a control for rSGD (y replicas of batch B)",
    )
    p.set_defaults(func=run_compare)

    p = subparsers.add_parser(
        "tune",
        help="grid-search one optimizer on a validation split",
        description="Grid search on a validation split (the test set is never used). Give "
        "every optimizer the same --trials and --budget-epochs (equal effort). Writes "
        "best.yaml (a preset fragment), trials.csv and tune.md.",
    )
    _add_common(p)
    p.add_argument("--optimizer", required=True, help="optimizer (or preset arm) to tune")
    p.add_argument("--grid", required=True, help="e.g. 'lr=0.02,0.05,0.1;gamma=1e-3,1e-2'")
    p.add_argument("--seeds", type=int, default=1, help="seeds per trial (default 1)")
    p.add_argument(
        "--trials",
        type=int,
        help="run exactly N grid points (seeded random subset; same N for every optimizer)",
    )
    p.set_defaults(func=run_tune)

    p = subparsers.add_parser(
        "study",
        help="correlate flatness measures with generalization over a grid of networks",
        description="Train the networks of a grid file (base: + grid:), measure local energy, "
        "Hessian trace (and local free entropy for small networks), and report Kendall tau / "
        "Spearman rho with bootstrap intervals and scatter plots.",
    )
    p.add_argument(
        "--grid", type=Path, required=True, help="study grid YAML file, or a shipped grid's name"
    )
    p.add_argument("--data", help="data set (overrides the grid's base)")
    p.add_argument("--model", help="model (overrides the grid's base)")
    p.add_argument(
        "--free-entropy",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure the local free entropy (default: automatic for small networks)",
    )
    p.add_argument("--n-boot", type=int, help="bootstrap resamples (default 1000)")
    p.add_argument("--device", help="cpu, cuda, ...")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="override any TrainConfig key for every network (repeatable)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (resumable)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run_study)


def run_compare(args: argparse.Namespace) -> int:
    from flatminima._table import format_table
    from flatminima.studies.compare import compare
    from flatminima.studies.report import compare_table_columns

    result = compare(
        args.out,
        preset=_preset(args),
        optimizers=args.optimizers,
        seeds=args.seeds,
        budget=args.budget,
        overrides=_overrides(args),
        sigmas=args.sigmas,
        flatness_draws=args.flatness_draws,
        flatness_samples=args.flatness_samples,
        large_batch=args.large_batch,
        progress=args.progress,
        jobs=args.jobs,
    )
    print(format_table(result.table, compare_table_columns(result)))
    if result.paired:
        print()
        print(
            format_table(
                result.paired,
                [
                    "budget",
                    "optimizer",
                    "reference",
                    "pairs",
                    "diff_test_error",
                    "diff_se",
                    "p_value",
                ],
            )
        )
    print(f"\nreport: {result.files.get('report')}")
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from flatminima._table import format_table
    from flatminima.studies.tune import rank_trials, tune

    result = tune(
        args.out,
        optimizer=args.optimizer,
        grid=args.grid,
        preset=_preset(args),
        overrides=_overrides(args),
        seeds=args.seeds,
        trials=args.trials,
        progress=args.progress,
    )
    keys = [k for k in result.fragment[result.optimizer]]
    ranked = rank_trials(result.trials)
    print(format_table(ranked, ["trial", *keys, "val_error", "val_loss", "train_error"]))
    print(
        f"\nbest ({result.optimizer}): {result.fragment[result.optimizer]}  "
        f"-> {result.out_dir / 'best.yaml'}"
    )
    return 0


def run_study(args: argparse.Namespace) -> int:
    from flatminima._table import format_table
    from flatminima.studies.correlation import correlation_study

    over: dict[str, Any] = {}
    for key in ("data", "model", "device"):
        if getattr(args, key) is not None:
            over[key] = getattr(args, key)
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"Invalid --set {item!r}: expected KEY=VALUE")
        key, val = item.split("=", 1)
        over[key.strip().replace("-", "_")] = parse_value(val)
    result = correlation_study(
        args.out,
        args.grid,
        overrides=over,
        free_entropy=args.free_entropy,
        n_boot=args.n_boot,
        progress=args.progress,
    )
    print(
        format_table(
            result.correlations,
            [
                "measure",
                "target",
                "n",
                "kendall_tau",
                "tau_ci_low",
                "tau_ci_high",
                "kendall_p",
                "spearman_rho",
                "spearman_p",
            ],
            digits=3,
        )
    )
    print(f"\nreport: {result.out_dir / 'report.md'}")
    return 0
