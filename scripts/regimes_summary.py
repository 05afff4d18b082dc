"""Per-seed test errors of the regime comparisons (reports/regimes/*/runs.csv) as Markdown.

Usage: python scripts/regimes_summary.py [REPORTS_DIR]   (default reports/regimes)

For each regime and budget: one row per arm with the test error of every seed (in %), the mean
± SE, the median, and, where the preset has a validation split, the early-stopped test error of
SGD. Used to write docs/regimes.md; the compare reports (report.md) have the paired statistics.
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from pathlib import Path


def _fmt(values: list[float]) -> str:
    return " / ".join(f"{100 * v:.2f}" for v in values)


def main(root: str = "reports/regimes") -> None:
    for runs_csv in sorted(Path(root).glob("*/runs.csv")):
        rows = [r for r in csv.DictReader(runs_csv.open()) if r["status"] == "complete"]
        print(f"\n### {runs_csv.parent.name}\n")
        print("| budget | arm | test error per seed (%) | mean ± SE | median |")
        print("|---|---|---|---|---|")
        keys = sorted(
            {(r["budget"], r["arm"]) for r in rows}, key=lambda k: (k[0] != "grad-evals", k)
        )
        for budget, arm in keys:
            rs = sorted(
                (r for r in rows if r["budget"] == budget and r["arm"] == arm),
                key=lambda r: int(r["seed"]),
            )
            errs = [float(r["test_error"]) for r in rs]
            se = statistics.stdev(errs) / math.sqrt(len(errs)) if len(errs) > 1 else float("nan")
            print(
                f"| {budget} | {arm} | {_fmt(errs)} | {100 * statistics.mean(errs):.2f} ± "
                f"{100 * se:.2f} | {100 * statistics.median(errs):.2f} |"
            )
            early = [r["early_stopped_test_error"] for r in rs if r["early_stopped_test_error"]]
            if arm == "sgd" and len(early) == len(rs):
                es = [float(e) for e in early]
                se = statistics.stdev(es) / math.sqrt(len(es)) if len(es) > 1 else float("nan")
                print(
                    f"| {budget} | sgd, early-stopped (val) | {_fmt(es)} | "
                    f"{100 * statistics.mean(es):.2f} ± {100 * se:.2f} | "
                    f"{100 * statistics.median(es):.2f} |"
                )


if __name__ == "__main__":
    main(*sys.argv[1:])
