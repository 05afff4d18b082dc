"""The ``flatminima`` command: train, compare, study, measure flatness, Gaussian-mixture theory.

Each subcommand lives in the command layer, :mod:`flatminima.commands` (one module per
subcommand), and registers itself here through a ``register(subparsers)`` function that adds its
parser and sets ``func`` (``func(args) -> int``). Only this module and the command modules use
argparse; the library modules they call know nothing of the command line.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import tempfile
import time
import traceback
import typing
from collections.abc import Sequence

from flatminima import __version__

SUBCOMMAND_MODULES = (
    "flatminima.commands.train",
    "flatminima.commands.data",
    "flatminima.commands.flatness",
    "flatminima.commands.studies",
    "flatminima.commands.gmm",
)


#: exit status of an unexpected exception (a bug): EX_SOFTWARE of sysexits.h
EXIT_INTERNAL = 70


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the full usage is in ``--help``)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    """Run the ``flatminima`` command; returns the exit status.

    Every expected failure (bad input, missing or corrupt files, OS errors such as a full disk)
    is printed as one line ``flatminima COMMAND: error: ...`` with exit status 1 (2 for usage
    errors, 130 for Ctrl-C). Anything else is a bug: one line ``internal error: ... (full trace
    in FILE)`` and exit status 70.
    """
    prefix = ["flatminima"]  # completed with the command once it is known
    try:
        return _run(argv, prefix)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - sorted into expected failures and bugs below
        message = describe_error(exc)
        if message is not None:
            print(f"{' '.join(prefix)}: error: {message}", file=sys.stderr)
            return 1
        print(f"{' '.join(prefix)}: {internal_error(exc)}", file=sys.stderr)
        return EXIT_INTERNAL


def _run(argv: Sequence[str] | None, prefix: list[str]) -> int:
    """Parse, set up logging and threads, run the subcommand (exceptions go to :func:`main`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        if not 1 <= args.threads <= 4096:
            parser.error(f"invalid --threads value: {args.threads} (must be in [1, 4096])")
        import torch

        torch.set_num_threads(args.threads)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    prefix.append(args.command)
    return int(args.func(args) or 0)


_EXPECTED = (ValueError, ImportError, RuntimeError, OSError, MemoryError, EOFError)


def describe_error(exc: BaseException) -> str | None:
    """One line for an expected failure, ``None`` for an unexpected exception (a bug).

    Expected: bad values (``ValueError``), missing optional packages, OS errors (missing files,
    permissions, a full or read-only disk), malformed YAML, corrupt pickles and torch's
    ``RuntimeError`` s (device errors, unreadable or unwritable checkpoints).
    """
    import pickle

    import yaml

    if isinstance(exc, MemoryError):
        return "out of memory"
    if isinstance(exc, OSError) and exc.strerror:
        return _os_error(exc)
    if isinstance(exc, (yaml.YAMLError, pickle.UnpicklingError)):
        return _one_line(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, RuntimeError) and _is_checkpoint_write_error(str(exc)):
        return "could not write a file (disk full or the folder not writable?): " + _one_line(
            str(exc)
        )
    if isinstance(exc, _EXPECTED):
        return _one_line(str(exc)) or type(exc).__name__
    return None


def _os_error(exc: OSError) -> str:
    """``strerror: filename`` with a hint for the usual causes."""
    hints = {
        errno.ENOSPC: " (disk full)",
        errno.EROFS: " (read-only file system)",
        errno.EACCES: " (no permission)",
        errno.ENOTDIR: " (a path component is a file, not a folder)",
    }
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    where = f": {' -> '.join(map(str, names))}" if names else ""
    return _one_line(f"{exc.strerror}{where}{hints.get(exc.errno or 0, '')}")


def _is_checkpoint_write_error(text: str) -> bool:
    return any(
        s in text for s in ("PytorchStreamWriter", "inline_container.cc", "file write failed")
    )


def internal_error(exc: BaseException) -> str:
    """Write the traceback to a file; return ``internal error: ... (full trace in FILE)``."""
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    summary = _one_line(f"{type(exc).__name__}: {exc}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        fd, path = tempfile.mkstemp(prefix=f"flatminima-error-{stamp}-", suffix=".txt")
        with os.fdopen(fd, "w") as fh:
            fh.write(trace)
    except OSError:
        sys.stderr.write(trace)
        return f"internal error: {summary} (full trace above)"
    return f"internal error: {summary} (full trace in {path}; please report it)"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
