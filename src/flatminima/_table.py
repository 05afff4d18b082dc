"""Plain-text and Markdown tables for the CLI and reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if value != 0 and (abs(value) < 10 ** (-digits) or abs(value) >= 1e6):
            return f"{value:.{digits}e}"
        return f"{value:.{digits}f}"
    return str(value)


def format_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    digits: int = 4,
    markdown: bool = False,
) -> str:
    """Format ``rows`` (dicts) as an aligned text table, or a GitHub Markdown table."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    cells = [[_fmt(row.get(c), digits) for c in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    # numbers right-aligned, text left-aligned
    numeric = [
        all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows)
        for c in columns
    ]

    def align(v: str, w: int, num: bool) -> str:
        return v.rjust(w) if num else v.ljust(w)

    head = "  ".join(align(c, w, n) for c, w, n in zip(columns, widths, numeric))
    sep = "  ".join("-" * w for w in widths)
    body = [
        "  ".join(align(v, w, n) for v, w, n in zip(r, widths, numeric)).rstrip() for r in cells
    ]
    return "\n".join([head, sep, *body])
