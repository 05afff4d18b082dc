"""The command layer: one module per ``flatminima`` subcommand (argparse, progress, tables).

Each module has ``register(subparsers)``, which adds its parser and sets ``func``
(``func(args) -> int``); :mod:`flatminima.cli` is the entry point that collects them. Library
modules never import this package: everything a command does is a library function that it
calls with the parsed options, and prints the result.
"""
