"""``flatminima train``: one run, every config key a flag, resumable from its folder."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from flatminima.train.config import TrainConfig, parse_value

_HELP = {
    "data": "data set name (see `flatminima data`)",
    "data_root": "folder with the data files (else $FLATMINIMA_DATA, system folders)",
    "model": "mlp, cnn, resnet18, wrn, or timm:NAME / torchvision:NAME",
    "model_kwargs": "model options, e.g. 'width=16,batchnorm=true' or a YAML mapping",
    "data_kwargs": "data set options (synthetic sets), e.g. 'num_train=2000,dim=50'",
    "optimizer": "sgd, esgd, rsgd or sam",
    "epochs": "budget in epochs (see --budget)",
    "budget": "grad-evals: equal gradient evaluations (default); epochs: epochs per replica",
    "gamma": "initial coupling gamma_0 (eSGD, rSGD)",
    "gamma_growth": "total growth of gamma over the run (scoping; the paper uses 1e4)",
    "val_size": "validation split carved from training data (fraction or count)",
    "flatness_epochs": "epochs at which to measure the local energy (-1: last), e.g. '1,5,-1'",
    "amp": "none, bf16 or fp16",
    "bn": "rSGD centre BatchNorm statistics: average or recalibrate",
    "grad_clip": "max global L2 norm of each minibatch gradient (per network; per replica for "
    "rsgd, before the coupling); default: no clipping",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_kwargs(text: str) -> dict[str, Any]:
    value = parse_value(text)
    if isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise argparse.ArgumentTypeError(
                f"invalid model option {part!r}: expected KEY=VALUE, e.g. width=16"
            )
        key, val = part.split("=", 1)
        out[key.strip()] = parse_value(val)
    return out


def _list_of(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        return [kind(p) for p in text.split(",") if p.strip()]

    return parse


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per TrainConfig field; only flags actually given override the config."""
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("run configuration (any config key)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        hint = hints[f.name]
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _HELP.get(f.name)}
        if f.name in ("model_kwargs", "data_kwargs"):
            kwargs["type"] = _parse_kwargs
        elif hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is list:
            (inner,) = typing.get_args(hint)
            kwargs["type"] = _list_of(inner)
        elif hint in (int, float, str):
            kwargs["type"] = hint
        else:  # optional values: parsed like YAML ("null", numbers)
            kwargs["type"] = parse_value
        group.add_argument(_flag(f.name), dest=f.name, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise ValueError(f"Invalid --set {item!r}: expected KEY=VALUE")
        key, val = item.split("=", 1)
        overrides[key.strip().replace("-", "_")] = parse_value(val)
    if getattr(args, "config", None):
        return TrainConfig.from_yaml(args.config, overrides)
    return TrainConfig.from_dict(overrides)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train one network (sgd, esgd, rsgd, sam) into a run folder",
        description="Train one network. The run folder gets config.yaml, metrics.csv, "
        "checkpoint.pt (every epoch) and summary.json; running the same command again "
        "resumes an interrupted run and skips a finished one.",
    )
    p.add_argument("--config", type=Path, help="YAML file of config keys (flags override it)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folder (default: runs/DATA-MODEL-OPTIMIZER-sSEED)",
    )
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override any config key (repeatable)"
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=argparse.SUPPRESS,
        help="no progress bar",
    )
    dist = p.add_argument_group("distributed (launch with torchrun)")
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="one replica per process on torch.distributed (rsgd), or data-parallel "
        "baselines (sgd, esgd, sam)",
    )
    dist.add_argument(
        "--procs-per-replica",
        type=int,
        default=1,
        help="data-parallel processes per replica (rsgd)",
    )
    dist.add_argument(
        "--dist-timeout",
        type=float,
        default=120.0,
        help="seconds before a collective waiting on a dead process fails",
    )
    add_config_arguments(p, skip=("progress",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flatminima._table import format_table
    from flatminima.train.loop import DivergenceError, train

    cfg = config_from_args(args)
    out = args.out or Path("runs") / f"{cfg.data}-{cfg.model}-{cfg.optimizer}-s{cfg.seed}"
    try:
        if args.distributed:
            from flatminima.distributed import train_distributed

            summary = train_distributed(
                cfg, out, procs_per_replica=args.procs_per_replica, timeout=args.dist_timeout
            )
            if summary is None:  # not rank 0: rank 0 reports
                return 0
        else:
            summary = train(cfg, out)
    except DivergenceError as exc:
        print(f"flatminima train: diverged: {exc}", file=sys.stderr)
        return 3
    final = summary["final"]
    cols = [
        c
        for c in (
            "epoch",
            "grad_evals",
            "train_loss",
            "train_error",
            "val_error",
            "test_loss",
            "test_error",
            "replica_mean_test_error",
            "ensemble_test_error",
            "train_time_s",
        )
        if c in final
    ]
    print(format_table([final], cols))
    label = "centre of the replicas" if cfg.optimizer == "rsgd" else "model"
    print(
        f"\n{cfg.optimizer} on {cfg.data}/{cfg.model}: test error {final['test_error']:.2%} "
        f"({label}), {summary['grad_evals']:,} gradient evaluations "
        f"[budget: {cfg.epochs:g} epochs, {cfg.budget}]"
    )
    print(f"run folder: {out}")
    return 0
