"""``flatminima data``: the data sets and where each was found."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("data", help="list the data sets and where each was found")
    p.add_argument("--root", default=None, help="also look in this folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flatminima._table import format_table
    from flatminima.data import describe_datasets

    rows = describe_datasets(args.root)
    print(format_table(rows))
    return 0
