"""``flatminima train``: one run, every config key a flag, resumable from its folder.

With ``--distributed`` the run goes to :func:`flatminima.distributed.train_distributed` (one
process per replica, launched by torchrun); the training library itself knows nothing of the
distributed package.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from flatminima._table import format_table
from flatminima.distributed import train_distributed
from flatminima.optim.registry import REGISTRY
from flatminima.train.config import TrainConfig, parse_override
from flatminima.train.loop import DivergenceError, train

_HELP = {
    # data
    "data": "data set name (see `flatminima data`); default fashion-mnist",
    "data_root": "folder with the data files; when given (or $FLATMINIMA_DATA is set) only that "
    "folder is searched",
    "data_kwargs": "data set options (synthetic sets), e.g. 'num_train=2000,dim=50'",
    "val_size": "validation split carved from the training data: a fraction in [0, 1) or a count",
    "train_subset": "keep only this many training samples (after the validation split)",
    "label_noise": "fraction in [0, 1) of training labels flipped to another class",
    "augment": "the data set's standard augmentation (random crop + flip for images)",
    # model
    "model": "mlp, cnn, resnet18, wrn, or timm:NAME / torchvision:NAME",
    "model_kwargs": "model options, e.g. 'width=16,batchnorm=true' or a YAML mapping",
    # optimisation
    "optimizer": "; ".join(f"{name}: {spec.description}" for name, spec in REGISTRY.items()),
    "lr": "learning rate (> 0), e.g. 0.05 or 1e-3",
    "momentum": "heavy-ball momentum (>= 0)",
    "nesterov": "Nesterov momentum (needs momentum > 0)",
    "weight_decay": "L2 weight decay (>= 0)",
    "batch_size": "minibatch size per network / replica",
    "epochs": "budget in epochs (see --budget)",
    "budget": "grad-evals: equal samples through backward (default); epochs: epochs of data "
    "per replica",
    "lr_schedule": "constant, cosine or step (see --lr-milestones, --lr-decay)",
    "warmup_epochs": "linear learning-rate warm-up over this many epochs",
    "lr_milestones": "step schedule: fractions of the run where lr is multiplied by --lr-decay, "
    "e.g. '0.5,0.75'",
    "lr_decay": "step schedule: factor applied to lr at each milestone (> 0)",
    "grad_clip": "max global L2 norm of each minibatch gradient (per network; per replica for "
    "rsgd, before the coupling); default: no clipping",
    # coupling
    "gamma": "initial coupling gamma_0 (eSGD, rSGD)",
    "gamma_growth": "total growth of gamma over the run (scoping; the paper uses 1e4)",
    "gamma_max": "cap on the coupling gamma (eSGD, rSGD); default: no cap",
    # Entropy-SGD
    "inner_steps": "eSGD: Langevin (inner) steps per outer step",
    "inner_lr": "eSGD: step size of the inner Langevin dynamics",
    "noise": "eSGD: noise of the inner Langevin dynamics (thermal noise, >= 0)",
    "mu_decay": "eSGD: decay in [0, 1) of the running average mu of the inner iterates",
    "scale_by_gamma": "eSGD: scale the outer step by 1/gamma (as in the paper)",
    # Replicated-SGD
    "num_replicas": "rSGD: number of coupled replicas y",
    "coupling_every": "rSGD: couple the replicas every this many steps",
    "replica_init": "rSGD: independent (each replica its own init) or same (one init)",
    "bn": "rSGD centre BatchNorm statistics: average or recalibrate",
    # SAM
    "rho": "SAM: radius of the ascent step",
    "adaptive": "SAM: adaptive (ASAM) ascent, scaled by |w|",
    # flatness during training
    "flatness_epochs": "evaluation points at which to measure the local energy (-1: last), "
    "e.g. '1,5,-1'",
    "flatness_sigmas": "local-energy noise strengths, e.g. '0.05,0.1,0.2'",
    "flatness_draws": "local energy: noise draws per sigma",
    "flatness_samples": "local energy: fixed training subset size",
    # evaluation
    "eval_points": "evaluations (metrics rows, checkpoints) over the run; 0: every epoch",
    "train_eval_samples": "training error measured on this many samples (0: all)",
    "evaluate_test": "evaluate the test set (--no-evaluate-test: validation split only, "
    "as in tuning trials)",
    "eval_batch_size": "batch size of evaluation passes (does not change the numbers)",
    # run
    "seed": "random seed, a whole number in [0, 2^32 - 1]",
    "device": "cpu, cuda, cuda:1, mps, ...",
    "amp": "mixed precision: none, bf16 or fp16",
    "deterministic": "deterministic kernels (bit-exact resume; slower on GPU)",
    "progress": "progress bar",
    "tensorboard": "also write TensorBoard logs into the run folder",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per TrainConfig field; only flags actually given override the config.

    Values stay text here: :func:`config_from_args` converts them with
    :func:`flatminima.train.config.coerce`, like every other source of settings.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser()
        >>> add_config_arguments(parser)
        >>> config_from_args(parser.parse_args(["--lr", "0.2", "--seed", "3"])).lr
        0.2

    """
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("run configuration (any config key)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _HELP[f.name]}
        if hints[f.name] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = _metavar(f.name, hints[f.name])
        group.add_argument(_flag(f.name), dest=f.name, **kwargs)


def _metavar(name: str, hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return "V1,V2"
    if typing.get_origin(hint) is dict:
        return "K=V,..."
    return name.upper()


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: ``--config`` file, then flags, then ``--set`` (last wins).

    Raises:
        ConfigError: an unknown key or a bad value (one line naming both).
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    for item in getattr(args, "set", None) or []:
        key, text = parse_override(item)
        overrides[key] = text
    if getattr(args, "config", None):
        return TrainConfig.from_yaml(args.config, overrides)
    return TrainConfig.from_dict(overrides)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help=f"train one network ({', '.join(REGISTRY)}) into a run folder",
        description="Train one network. The run folder gets config.yaml, metrics.csv, "
        "checkpoint.pt (every evaluation point) and summary.json; running the same command again "
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
        help="one replica per process on torch.distributed ("
        + ", ".join(n for n, s in REGISTRY.items() if s.needs_replicas)
        + "), or data-parallel baselines ("
        + ", ".join(n for n, s in REGISTRY.items() if not s.needs_replicas)
        + ")",
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


def check_out_folder(out: Path) -> None:
    """Refuse a run folder path that names something other than a folder (a file, /dev/null).

    Raises:
        NotADirectoryError: ``out`` or one of its parents exists and is not a folder.
    """
    for path in (out, *out.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                what = "a file" if path.is_file() else "not a folder"
                raise NotADirectoryError(f"--out {out}: {path} exists and is {what}")
            return


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = args.out or Path("runs") / f"{cfg.data}-{cfg.model}-{cfg.optimizer}-s{cfg.seed}"
    check_out_folder(out)
    try:
        if args.distributed:
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
            "eval_point",
            "samples",
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
    label = "centre of the replicas" if REGISTRY[cfg.optimizer].needs_replicas else "model"
    key, held_out = ("test_error", "test") if cfg.evaluate_test else ("val_error", "validation")
    print(
        f"\n{cfg.optimizer} on {cfg.data}/{cfg.model}: {held_out} error {final[key]:.2%} "
        f"({label}), {summary['samples']:,} samples through backward "
        f"[budget: {cfg.epochs:g} epochs, {cfg.budget}]"
    )
    print(f"run folder: {out}")
    return 0
