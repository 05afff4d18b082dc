"""``flatminima compare``, ``flatminima tune`` and ``flatminima study`` (tables printed here)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flatminima._table import format_table
from flatminima.optim.registry import REGISTRY
from flatminima.studies.compare import compare
from flatminima.studies.correlation import correlation_study
from flatminima.studies.executors import make_executor
from flatminima.studies.presets import load_preset
from flatminima.studies.report import compare_table_columns, correlation_table_columns
from flatminima.studies.tune import rank_trials, trial_columns, tune
from flatminima.train.config import coerce, parse_override
from flatminima.train.values import to_float, to_int

__all__ = ["register"]


def _floats(text: str) -> list[float]:
    try:
        return [to_float("value", p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid list {text!r}: expected comma-separated finite numbers, e.g. 0.05,0.1"
        ) from None


def _count(low: int) -> Any:
    """An argparse type: a whole number >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = to_int("value", text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: a whole number >= {low}")
        return value

    parse.__name__ = f"whole number >= {low}"
    return parse


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
    p.add_argument("--train-subset", type=_count(1), help="keep this many training samples")
    p.add_argument("--label-noise", type=float, help="fraction of training labels flipped")
    p.add_argument("--budget-epochs", type=float, help="budget in epochs (see --budget)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    _add_output(p, "run")


def _add_output(p: argparse.ArgumentParser, what: str) -> None:
    """``--set`` (a TrainConfig override for every ``what``), ``--out`` and ``--no-progress``."""
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help=f"override any TrainConfig key for every {what} (repeatable)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (resumable)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig overrides of the flags a subcommand has (others are absent), then --set."""
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
        key, text = parse_override(item)
        over[key] = coerce(key, text)
    return over


def _preset(args: argparse.Namespace) -> Any:
    if args.preset and args.preset_file:
        raise ValueError("Give either --preset or --preset-file, not both")
    source = args.preset_file or args.preset
    return load_preset(source) if source else None


def _add_executor(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--executor",
        choices=["local", "serial", "submitit"],
        default="local",
        help="where runs train: local process pool (--jobs), this process, or submitit "
        "(SLURM, or its local mode with --submitit-cluster local)",
    )
    p.add_argument(
        "--jobs",
        type=_count(1),
        default=1,
        help="local executor: training processes at once, each with cores/jobs threads (default 1)",
    )
    p.add_argument("--submitit-folder", type=Path, help="submitit logs (default OUT/submitit)")
    p.add_argument("--submitit-cluster", help="slurm, local or debug (default: auto)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--timeout-min", type=_count(1), default=60, help="job time limit in minutes")
    p.add_argument(
        "--cpus-per-task", type=_count(1), default=1, help="CPUs (torch threads) per job"
    )
    p.add_argument("--gpus-per-node", type=_count(0), default=0, help="GPUs per job")
    p.add_argument("--runs-per-job", type=_count(1), default=1, help="runs trained in one job")


def _executor(args: argparse.Namespace) -> Any:
    if args.executor != "submitit":
        return make_executor(args.executor, jobs=args.jobs)
    opts: dict[str, Any] = {
        "folder": args.submitit_folder or Path(args.out) / "submitit",
        "cluster": args.submitit_cluster,
        "runs_per_job": args.runs_per_job,
        "timeout_min": args.timeout_min,
        "cpus_per_task": args.cpus_per_task,
        "gpus_per_node": args.gpus_per_node,
    }
    if args.partition:
        opts["slurm_partition"] = args.partition
    return make_executor("submitit", **opts)


def register(subparsers: Any) -> None:
    """Add the ``compare``, ``tune`` and ``study`` subcommands."""
    _register_compare(subparsers)
    _register_tune(subparsers)
    _register_study(subparsers)


def _register_compare(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare optimizers over paired seeds at equal budget, with flatness",
        description="Train every (optimizer, seed) at equal samples through backward (default) or "
        "equal epochs per replica, measure the local energy of each final network, and write "
        "a report folder (report.md, results.json/CSV, PNG plots). Re-running skips finished "
        "runs and cached measurements.",
    )
    _add_common(p)
    p.add_argument(
        "--optimizers",
        type=_names,
        help=f"comma-separated optimizers or preset arms (default {','.join(REGISTRY)})",
    )
    p.add_argument("--seeds", type=_count(1), help="number of paired seeds (default 3)")
    _add_executor(p)
    p.add_argument(
        "--no-tune",
        dest="tune",
        action="store_false",
        default=None,
        help="skip the preset's study.tuning (hyperparameters as given in the preset)",
    )
    p.add_argument("--margin", type=float, help="TOST equivalence margin (default: preset, 0.003)")
    p.add_argument(
        "--budget",
        choices=["grad-evals", "equal-grad-evals", "epochs", "equal-epochs", "both"],
        help="equal samples through backward (default), equal epochs per replica, or both",
    )
    p.add_argument(
        "--sigmas", type=_floats, help="local-energy noise strengths (default 0.05,0.1,0.2,0.3,0.5)"
    )
    p.add_argument("--flatness-draws", type=_count(1), help="noise draws per sigma (default 5)")
    p.add_argument(
        "--flatness-samples",
        type=_count(0),
        help="fixed training subset for the local energy (default 2000)",
    )
    p.add_argument(
        "--large-batch",
        action="store_true",
        default=None,
        help="add SGD with batch y*B as a control for rSGD (y replicas of batch B)",
    )
    p.set_defaults(func=run_compare)


def _register_tune(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "tune",
        help="grid-search one optimizer on a validation split",
        description="Grid search on a validation split (the test set is never used). Give "
        "every optimizer the same number of trials and --budget-epochs (equal effort); a chosen "
        "point on a grid edge extends that axis (--max-extend). Writes best.yaml (a preset "
        "fragment), trials.csv, tuning.json and tune.md.",
    )
    _add_common(p)
    p.add_argument("--optimizer", required=True, help="optimizer (or preset arm) to tune")
    p.add_argument(
        "--grid",
        required=True,
        help="e.g. 'lr=0.02,0.05,0.1;gamma=1e-3,1e-2'; each optimizer's knobs: "
        + "; ".join(f"{n}: {','.join(s.knobs)}" for n, s in REGISTRY.items()),
    )
    p.add_argument(
        "--then",
        help="axes tried at the chosen point, e.g. 'inner_lr=0.05,0.2'; follow-up knobs: "
        + "; ".join(
            f"{n}: {','.join(s.follow_up_knobs)}" for n, s in REGISTRY.items() if s.follow_up_knobs
        ),
    )
    p.add_argument("--seeds", type=_count(1), default=3, help="tuning seeds 0..N-1 (default 3)")
    p.add_argument("--max-extend", type=_count(0), default=2, help="edge extension steps per axis")
    p.add_argument(
        "--allow-weak-selection",
        action="store_true",
        help="allow < 3 seeds with < 5000 validation images (selection is then mostly noise)",
    )
    _add_executor(p)
    p.set_defaults(func=run_tune)


def _register_study(subparsers: Any) -> None:
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
    p.add_argument("--n-boot", type=_count(1), help="bootstrap resamples (default 1000)")
    p.add_argument("--device", help="cpu, cuda, ...")
    _add_output(p, "network")
    _add_executor(p)
    p.set_defaults(func=run_study)


def run_compare(args: argparse.Namespace) -> int:
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
        executor=_executor(args),
        tune=args.tune,
        margin=args.margin,
    )
    print(format_table(result.table, compare_table_columns(result)))
    if result.paired:
        cols = ["budget", "subset", "optimizer", "reference", "pairs", "mean", "se"]
        print()
        print(format_table(result.paired, [*cols, "p_t_holm", "p_perm_holm", "verdict"]))
    print(f"\nreport: {result.files.get('report')}")
    return 0


def run_tune(args: argparse.Namespace) -> int:
    result = tune(
        args.out,
        optimizer=args.optimizer,
        grid=args.grid,
        preset=_preset(args),
        overrides=_overrides(args),
        then=args.then,
        seeds=args.seeds,
        max_extend=args.max_extend,
        allow_weak=args.allow_weak_selection,
        executor=_executor(args),
    )
    ranked = rank_trials(result.trials)
    print(format_table([dict(t) for t in ranked], trial_columns(result)))
    print(
        f"\nbest ({result.optimizer}): {result.fragment[result.optimizer]}  "
        f"-> {result.out_dir / 'best.yaml'}"
    )
    return 0


def run_study(args: argparse.Namespace) -> int:
    result = correlation_study(
        args.out,
        args.grid,
        overrides=_overrides(args),
        free_entropy=args.free_entropy,
        n_boot=args.n_boot,
        progress=args.progress,
        executor=_executor(args),
    )
    print(format_table(result.correlations, correlation_table_columns(full=False), digits=3))
    print(f"\nreport: {result.out_dir / 'report.md'}")
    return 0
