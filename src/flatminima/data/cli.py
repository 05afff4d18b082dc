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
    table, missing = [], []
    for r in rows:
        about, _, how = str(r.get("notes", "")).partition(" Not found: ")
        where = r["path"] or (
            "(generated)"
            if r["kind"] == "synthetic"
            else "(scikit-learn)"
            if r["name"] == "digits"
            else "not found"
        )
        table.append(
            {
                "name": r["name"],
                "found": "yes" if r["found"] else "no",
                "where": where,
                "what": about,
            }
        )
        if how:
            missing.append(f"  {r['name']}: {how}")
    print(format_table(table, ["name", "found", "where", "what"]))
    if missing:
        print("\nHow to obtain the missing ones:")
        print("\n".join(missing))
    return 0
