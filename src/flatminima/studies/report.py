"""Report folders: Markdown (report.md) with tables and image links, JSON and CSV, PNG plots."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flatminima._table import format_table

if TYPE_CHECKING:
    from flatminima.studies.compare import CompareResult
    from flatminima.studies.correlation import StudyResult

log = logging.getLogger(__name__)

__all__ = [
    "compare_table_columns",
    "measure_label",
    "write_compare_report",
    "write_csv",
    "write_json",
    "write_study_report",
]


def write_json(obj: Any, path: Path) -> Path:
    """Write ``obj`` as indented JSON atomically (NaN written as ``NaN``, floats as floats)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)
    return path


def write_csv(
    rows: Sequence[dict[str, Any]], path: Path, columns: Sequence[str] | None = None
) -> Path:
    """Write dict rows as CSV (columns: ``columns`` or the union of keys in order)."""
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def compare_table_columns(result: CompareResult) -> list[str]:
    """Columns of the main comparison table (the ``_se`` columns of dE stay in the CSV)."""
    cols = ["optimizer", "seeds", "test_error", "test_error_std", "test_error_se", "train_error"]
    cols += [f"dE({s:g})" for s in result.settings["sigmas"]]
    cols += ["grad_evals", "train_time_s"]
    if len(result.settings["budgets"]) > 1:
        cols.insert(0, "budget")
    return cols


def _budget_suffix(result: CompareResult, budget: str) -> str:
    return "" if len(result.settings["budgets"]) == 1 else f"_{budget}"


#: settings that only matter to one algorithm (shown as "-" for the others)
_SPECIFIC = {
    "esgd": {
        "inner_steps",
        "inner_lr",
        "noise",
        "mu_decay",
        "scale_by_gamma",
        "gamma",
        "gamma_growth",
        "gamma_max",
    },
    "rsgd": {
        "num_replicas",
        "coupling_every",
        "replica_init",
        "bn",
        "gamma",
        "gamma_growth",
        "gamma_max",
    },
    "sam": {"rho", "adaptive"},
}


def _differing(configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm, the hyperparameters that differ between arms and matter to its algorithm."""
    specific = set().union(*_SPECIFIC.values())

    def relevant(cfg: dict[str, Any], key: str) -> bool:
        return key not in specific or key in _SPECIFIC.get(cfg.get("optimizer", ""), set())

    keys = sorted({k for c in configs.values() for k in c if k != "optimizer"})
    diff = [
        k
        for k in keys
        if len(
            {
                json.dumps(c.get(k), sort_keys=True, default=str)
                for c in configs.values()
                if relevant(c, k)
            }
        )
        > 1
        or (k in specific and any(relevant(c, k) for c in configs.values()))
    ]
    return [
        {"optimizer": a, **{k: c.get(k) if relevant(c, k) else None for k in diff}}
        for a, c in configs.items()
    ]


def write_compare_report(result: CompareResult) -> dict[str, str]:
    """Write ``report.md``, ``results.json``, ``results.csv``, ``paired.csv``, ``runs.csv`` and
    the PNGs (``learning_curves*.png``, ``local_energy*.png``) into ``result.out_dir``.

    Returns:
        ``{name: path}`` of the files written (also stored in ``result.files``).
    """
    from flatminima.studies.compare import BUDGET_LABELS
    from flatminima.studies.plots import plot_energy_curves, plot_learning_curves

    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    s = result.settings
    for b in s["budgets"]:
        suffix = _budget_suffix(result, b)
        label = BUDGET_LABELS[b]
        files[f"learning_curves{suffix}"] = str(
            plot_learning_curves(
                result.curves[b],
                out / f"learning_curves{suffix}.png",
                title=f"Test error during training ({label})",
            )
        )
        files[f"local_energy{suffix}"] = str(
            plot_energy_curves(
                result.energy[b],
                out / f"local_energy{suffix}.png",
                title=f"Local energy of the final networks ({label})",
            )
        )
    files["results_csv"] = str(write_csv(result.table, out / "results.csv"))
    files["paired_csv"] = str(write_csv(result.paired, out / "paired.csv"))
    run_rows = [
        {k: v for k, v in r.items() if k != "history" and not isinstance(v, list)}
        for r in result.runs
    ]
    files["runs_csv"] = str(write_csv(run_rows, out / "runs.csv"))
    files["report"] = str(out / "report.md")
    files["results_json"] = str(out / "results.json")
    result.files = files
    write_json(result.to_dict(), out / "results.json")

    lines = ["# Optimizer comparison", ""]
    if s.get("preset_description"):
        lines += [s["preset_description"].strip(), ""]
    lines += [
        f"- Seeds: {', '.join(map(str, s['seeds']))} (paired: seed s gives every optimizer the "
        "same data split, subset and data order)",
        "- Budget: " + "; ".join(f"**{BUDGET_LABELS[b]}** (`{b}`)" for b in s["budgets"]),
        f"- Local energy ΔE(σ): train-error increase under multiplicative weight noise "
        f"w(1 + σξ), {s['flatness_draws']} draws, on a fixed subset of "
        f"{s['flatness_samples']} training samples, measured on the final evaluated network "
        "(the centre for rSGD); mean over seeds.",
        f"- Preset: `{s['preset']}`" if s.get("preset") else "- Preset: TrainConfig defaults",
        "- Errors are fractions; `std` is the sample standard deviation over seeds, `se` the "
        "standard error (std / sqrt(n)).",
        "",
    ]
    for b in s["budgets"]:
        suffix = _budget_suffix(result, b)
        rows = [r for r in result.table if r["budget"] == b]
        cols = [c for c in compare_table_columns(result) if c != "budget"]
        lines += [f"## {BUDGET_LABELS[b]}", "", format_table(rows, cols, markdown=True), ""]
        pair_rows = [r for r in result.paired if r["budget"] == b]
        if pair_rows:
            lines += [
                "Paired difference of test error against the reference (negative: better "
                "than the reference), mean over seeds ± SE, 95% t interval, paired t-test:",
                "",
                format_table(
                    pair_rows,
                    [
                        "optimizer",
                        "reference",
                        "pairs",
                        "diff_test_error",
                        "diff_se",
                        "ci_low",
                        "ci_high",
                        "p_value",
                    ],
                    markdown=True,
                ),
                "",
            ]
        lines += [
            f"![learning curves](learning_curves{suffix}.png)",
            "",
            f"![local energy](local_energy{suffix}.png)",
            "",
        ]
    lines += [
        "## Hyperparameters",
        "",
        "Settings that differ between optimizers (all settings: `results.json`, `configs`):",
        "",
    ]
    for b in s["budgets"]:
        rows = _differing(result.configs[b])
        if len(rows[0]) > 1:
            lines += [format_table(rows, markdown=True), ""]
        else:
            lines += ["(all optimizers share every setting)", ""]
        break  # the settings differ between budgets only in `budget`
    lines += [
        "## Files",
        "",
        "- `results.json`: everything above, per-run records, curves",
        "- `results.csv`, `paired.csv`, `runs.csv`",
        "- `runs/BUDGET/OPTIMIZER/seedS/`: "
        "run folders (config.yaml, metrics.csv, summary.json, flatness.json)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    log.info("wrote report %s", out / "report.md")
    return files


def measure_label(key: str) -> str:
    """A readable axis label for a study column."""
    if key.startswith("local_energy_error_s"):
        return f"local energy ΔE_error(σ={key.removeprefix('local_energy_error_s')})"
    if key.startswith("local_energy_loss_s"):
        return f"local energy ΔE_loss(σ={key.removeprefix('local_energy_loss_s')})"
    return {
        "hessian_trace": "Hessian trace (Hutchinson)",
        "neg_free_entropy": "-Φ (minus local free entropy)",
        "test_error": "test error",
        "gen_gap": "generalization gap (test - train error)",
    }.get(key, key)


def write_study_report(result: StudyResult) -> dict[str, str]:
    """Write ``report.md``, ``networks.csv``, ``correlations.csv``, ``study.json`` and one
    scatter PNG per flatness measure (``scatter_MEASURE.png``) into ``result.out_dir``."""
    from flatminima.studies.correlation import TARGETS
    from flatminima.studies.plots import plot_scatter

    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "networks_csv": str(write_csv(result.records, out / "networks.csv")),
        "correlations_csv": str(write_csv(result.correlations, out / "correlations.csv")),
    }
    labels = {k: measure_label(k) for k in [*result.measures, *TARGETS]}
    images = []
    for m in result.measures:
        pts = [r for r in result.records if m in r]
        if not pts:
            continue
        stats = {
            c["target"]: f"Kendall τ = {c['kendall_tau']:.2f} "
            f"[{c['tau_ci_low']:.2f}, {c['tau_ci_high']:.2f}]"
            for c in result.correlations
            if c["measure"] == m and c["target"] in TARGETS
        }
        name = f"scatter_{m}.png"
        plot_scatter(pts, m, list(TARGETS), out / name, labels=labels, stats=stats)
        files[name] = str(out / name)
        images.append((m, name))
    write_json(
        {
            "records": result.records,
            "correlations": result.correlations,
            "measures": result.measures,
            "settings": result.settings,
            "files": files,
        },
        out / "study.json",
    )
    s = result.settings
    cols = [
        "measure",
        "target",
        "n",
        "kendall_tau",
        "tau_ci_low",
        "tau_ci_high",
        "kendall_p",
        "spearman_rho",
        "rho_ci_low",
        "rho_ci_high",
        "spearman_p",
    ]
    main = [c for c in result.correlations if c["target"] in TARGETS]
    cross = [c for c in result.correlations if c["target"] not in TARGETS]
    lines = ["# Flatness vs generalization", ""]
    if s.get("description"):
        lines += [str(s["description"]).strip(), ""]
    lines += [
        f"- {s['n_networks']} networks over the grid "
        + ", ".join(f"`{k}` in {v}" for k, v in s["grid"].items()),
        "- Measures (larger = sharper): local energy ΔE(σ) (train error / loss increase under "
        "multiplicative weight noise), Hessian trace, and -Φ (minus the local free entropy) "
        "for small networks. Measured on a fixed training subset of "
        f"{s['measure']['n_samples']} samples.",
        f"- Kendall τ-b and Spearman ρ with scipy p-values and percentile bootstrap 95% "
        f"intervals ({s['n_boot']} resamples of the networks).",
        "",
        "## Correlation with test error and generalization gap",
        "",
        format_table(main, cols, markdown=True) if main else "(fewer than 3 networks)",
        "",
    ]
    if cross:
        lines += [
            "## Agreement between flatness measures",
            "",
            "Rank correlation of -Φ (local free entropy) with each other measure:",
            "",
            format_table(cross, cols, markdown=True),
            "",
        ]
    lines += ["## Scatter plots", ""]
    lines += [f"![{measure_label(m)}]({name})\n" for m, name in images]
    lines += [
        "## Networks",
        "",
        f"All {len(result.records)} networks: `networks.csv`; "
        "correlations: `correlations.csv`; everything: `study.json`.",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    files["report"] = str(out / "report.md")
    log.info("wrote study report %s", out / "report.md")
    return files
