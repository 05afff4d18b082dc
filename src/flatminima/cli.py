"""The ``flatminima`` command: train, compare, study, measure flatness, Gaussian-mixture theory.

Each subcommand lives in the module of its concept and registers itself here through a
``register(subparsers)`` function that adds its parser and sets ``func`` (``func(args) -> int``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from flatminima import __version__

SUBCOMMAND_MODULES = (
    "flatminima.train.cli",
    "flatminima.data.cli",
    "flatminima.flatness.cli",
    "flatminima.studies.cli",
    "flatminima.gmm.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flatminima",
        description="Entropic flat-minima optimizers (Entropy-SGD, Replicated-SGD, SAM) "
        "and flatness measures for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"flatminima {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v: info, -vv: debug)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: torch's choice; on a busy machine "
        "1 thread per process is often much faster)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a subcommand not shipped in this build
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"invalid --threads value: {args.threads} (must be >= 1)")
        import torch

        torch.set_num_threads(args.threads)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        print(f"flatminima {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
