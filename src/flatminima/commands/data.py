"""``flatminima data``: the data sets and where each was found; ``--download NAME`` fetches one."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from flatminima._table import format_table
from flatminima.data import describe_datasets, download_dataset


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "data",
        help="list the data sets and where each was found; download one",
        description="List every data set and the folder it was found in. With --root (or "
        "$FLATMINIMA_DATA set) only that folder is searched. --download NAME fetches the files "
        "of NAME (checksummed) into --root, else $FLATMINIMA_DATA, else ~/.cache/flatminima.",
    )
    p.add_argument(
        "--root",
        default=None,
        metavar="FOLDER",
        help="search only this folder (and where --download puts the files)",
    )
    p.add_argument(
        "--download",
        metavar="NAME",
        default=None,
        help="download NAME's files with checksums (fashion-mnist, mnist, cifar10, cifar100)",
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no download progress bar"
    )
    p.set_defaults(func=run)


def _progress_bar() -> Any:
    """A ``progress(filename, done, total)`` callback drawing one tqdm bar per file."""
    from tqdm.auto import tqdm

    bars: dict[str, Any] = {}

    def update(filename: str, done: int, total: int | None) -> None:
        bar = bars.get(filename)
        if bar is None:
            bar = bars[filename] = tqdm(
                total=total, desc=filename, unit="B", unit_scale=True, file=sys.stderr
            )
        bar.update(done - bar.n)
        if total is not None and done >= total:
            bar.close()

    return update


def run(args: argparse.Namespace) -> int:
    if args.download:
        return _download(args)
    return _list(args)


def _download(args: argparse.Namespace) -> int:
    folder = download_dataset(
        args.download, args.root, progress=_progress_bar() if args.progress else None
    )
    print(f"{args.download}: files verified in {folder}")
    return 0


def _list(args: argparse.Namespace) -> int:
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
