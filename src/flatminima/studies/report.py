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
from flatminima.optim.registry import REGISTRY
from flatminima.studies.plots import plot_energy_curves, plot_learning_curves, plot_scatter
from flatminima.studies.stats import MAX_EXACT

if TYPE_CHECKING:
    from flatminima.studies.compare import CompareResult
    from flatminima.studies.correlation import StudyResult

log = logging.getLogger(__name__)

#: budget name (TrainConfig.budget) -> label used in every table and plot
BUDGET_LABELS = {"grad-evals": "equal gradient evaluations", "epochs": "equal epochs per replica"}

__all__ = [
    "BUDGET_LABELS",
    "compare_table_columns",
    "correlation_table_columns",
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
    cols = ["optimizer", "seeds", "collapsed", "test_error", "test_error_std", "test_error_se"]
    cols += ["test_error_without_collapsed", "train_error"]
    cols += [f"dE({s:g})" for s in result.settings["sigmas"]]
    cols += ["samples", "train_time_s"]
    if len(result.settings["budgets"]) > 1:
        cols.insert(0, "budget")
    return cols


def correlation_table_columns(*, full: bool = True) -> list[str]:
    """Columns of the correlation table: the report's (``full``) or the terminal's, which leaves
    out the Holm-adjusted p-value and Spearman's interval."""
    cols = ["measure", "target", "n", "kendall_tau", "tau_ci_low", "tau_ci_high", "kendall_p"]
    cols += ["kendall_p_holm", "spearman_rho", "rho_ci_low", "rho_ci_high", "spearman_p"]
    if full:
        return cols
    return [c for c in cols if c not in ("kendall_p_holm", "rho_ci_low", "rho_ci_high")]


def _budget_suffix(result: CompareResult, budget: str) -> str:
    return "" if len(result.settings["budgets"]) == 1 else f"_{budget}"


#: settings that matter only to some optimizers (shown as "-" for the others), from the registry
_SPECIFIC = {name: set(spec.settings) for name, spec in REGISTRY.items()}


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
    """Write ``report.md``, ``results.json``, ``results.csv``, ``paired.csv``,
    ``flatness_tests.csv``, ``runs.csv`` (with the ``flag`` column: ok / collapsed / diverged)
    and the PNGs (``learning_curves*.png``, ``local_energy*.png``) into ``result.out_dir``.

    Returns:
        ``{name: path}`` of the files written (also stored in ``result.files``).
    """
    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    files = _compare_plots(result)
    files["results_csv"] = str(write_csv(result.table, out / "results.csv"))
    files["paired_csv"] = str(write_csv(result.paired, out / "paired.csv"))
    files["flatness_tests_csv"] = str(write_csv(result.flatness_tests, out / "flatness_tests.csv"))
    run_rows = [
        {k: v for k, v in r.items() if k != "history" and not isinstance(v, list)}
        for r in result.runs
    ]
    files["runs_csv"] = str(write_csv(run_rows, out / "runs.csv"))
    files["report"] = str(out / "report.md")
    files["results_json"] = str(out / "results.json")
    result.files = files
    write_json(result.to_dict(), out / "results.json")
    lines = ["# Optimizer comparison", "", *_compare_header(result)]
    for b in result.settings["budgets"]:
        lines += _budget_section(result, b)
    lines += _tuning_section(result) + _hyperparameter_section(result)
    lines += [
        "## Files",
        "",
        "- `results.json`: everything above, per-run records, curves, tuning",
        "- `results.csv`, `paired.csv`, `flatness_tests.csv`, `runs.csv` (column `flag`)",
        "- `runs/BUDGET/OPTIMIZER/seedS/`: "
        "run folders (config.yaml, metrics.csv, summary.json, flatness.json)",
        "- `tuning/BUDGET/OPTIMIZER/`: trials.csv, tuning.json, tune.md (when tuned)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    log.info("wrote report %s", out / "report.md")
    return files


def _compare_plots(result: CompareResult) -> dict[str, str]:

    files: dict[str, str] = {}
    for b in result.settings["budgets"]:
        suffix, label = _budget_suffix(result, b), BUDGET_LABELS[b]
        files[f"learning_curves{suffix}"] = str(
            plot_learning_curves(
                result.curves[b],
                result.out_dir / f"learning_curves{suffix}.png",
                title=f"Test error during training ({label})",
            )
        )
        files[f"local_energy{suffix}"] = str(
            plot_energy_curves(
                result.energy[b],
                result.out_dir / f"local_energy{suffix}.png",
                title=f"Local energy of the final networks ({label})",
            )
        )
    return files


def _compare_header(result: CompareResult) -> list[str]:

    s = result.settings
    lines = [s["preset_description"].strip(), ""] if s.get("preset_description") else []
    frac = s.get("collapse_fraction", 0.9)
    lines += [
        f"- Evaluation seeds: {', '.join(map(str, s['seeds']))} (paired: seed s gives every "
        "optimizer the same data split, subset and data order)"
        + (f"; tuning seeds (disjoint): {s['tuning_seeds']}" if s.get("tuning_seeds") else ""),
        "- Budget: " + "; ".join(f"**{BUDGET_LABELS[b]}** (`{b}`)" for b in s["budgets"]),
        f"- Local energy ΔE(σ): train-error increase under multiplicative weight noise "
        f"w(1 + σξ), {s['flatness_draws']} draws, on a fixed subset of "
        f"{s['flatness_samples']} training samples, measured on the final evaluated network "
        "(the centre for rSGD); mean over seeds.",
        f"- Preset: `{s['preset']}`" if s.get("preset") else "- Preset: TrainConfig defaults",
        "- Hyperparameters: "
        + (
            "tuned by this run with equal effort (section Tuning)"
            if s.get("tuned")
            else "as given by the preset, not tuned by this run"
            + (f" (provenance: {s['provenance']})" if s.get("provenance") else "")
        ),
        f"- Collapsed run: a complete run whose final training error >= {frac:g} (1 - 1/C) and "
        f"training loss >= {frac:g} log C (chance level, C classes). `collapsed` counts them "
        "per arm; `test_error` includes them, `test_error_without_collapsed` does not; paired "
        "tests are shown with them (`all`) and, when any run collapsed, without them.",
        "- Paired tests per comparison: mean difference d = arm - reference (negative: arm "
        "better), 95% t interval, paired t-test `p_t`, exact sign-flip permutation test "
        f"`p_perm` (all 2^n sign patterns for n <= {MAX_EXACT}), both Holm-adjusted over the "
        "comparisons of one table (`_holm`), and TOST equivalence `p_tost` against the margin "
        f"{s.get('margin', 0.003):g} fixed before the run.",
        "- Verdict: `win`/`loss` when the larger of the two Holm-adjusted p-values is < 0.05; "
        "else `equivalent` when p_tost < 0.05; else `unsettled`.",
        "- Errors are fractions; `std` is the sample standard deviation over seeds, `se` the "
        "standard error (std / sqrt(n)).",
        f"- Executor: {s.get('executor', {}).get('name', 'serial')}",
        "",
    ]
    return lines


_PAIRED_COLS = [
    "optimizer",
    "reference",
    "pairs",
    "mean",
    "se",
    "ci_low",
    "ci_high",
    "p_t",
    "p_t_holm",
    "p_perm",
    "p_perm_holm",
    "p_tost",
    "verdict",
]


def _budget_section(result: CompareResult, b: str) -> list[str]:

    suffix = _budget_suffix(result, b)
    rows = [r for r in result.table if r["budget"] == b]
    cols = [c for c in compare_table_columns(result) if c != "budget"]
    lines = [f"## {BUDGET_LABELS[b]}", "", format_table(rows, cols, markdown=True), ""]
    controls = result.settings.get("controls", {}).get(b, {})
    if controls:
        lines += [
            "Controls: "
            + "; ".join(
                f"`{c}` for `{a}`"
                + (
                    " (SGD with batch y x B)"
                    if c == "sgd-large-batch"
                    else " (SGD with the same gradient evaluations)"
                )
                for c, a in controls.items()
            )
            + (
                ". Controls were tuned at their own budget with the SGD arm's search "
                "(section Tuning)."
                if result.settings.get("control_tuning") == "tuned"
                else ". Controls take the SGD arm's settings."
            ),
            "",
        ]
    for subset in ("all", "without collapsed", "early-stopped"):
        prs = [r for r in result.paired if r["budget"] == b and r.get("subset") == subset]
        if prs:
            what = (
                "every network at its evaluation point of lowest validation error, "
                "a family of its own"
                if subset == "early-stopped"
                else f"{subset} runs"
            )
            lines += [
                f"Paired test error ({what}):",
                "",
                format_table(prs, _PAIRED_COLS, markdown=True),
                "",
            ]
    flat = [r for r in result.flatness_tests if r["budget"] == b]
    if flat:
        lines += [
            "Paired local energy ΔE(σ) against SGD (`win`: flatter). `final`: SGD's final "
            "network; `matched train error`: for each seed, SGD's evaluation point whose "
            "training error is closest to the arm's final training error (ties: the later "
            "point; its ΔE measured during training on the same subset, noise seeded by the "
            "run seed), mean gap "
            "`train_error_gap`. No equivalence margin: not significant is `unsettled`.",
            "",
            format_table(
                flat,
                [
                    "optimizer",
                    "against",
                    "sigma",
                    "pairs",
                    "mean",
                    "se",
                    "p_t",
                    "p_t_holm",
                    "p_perm",
                    "p_perm_holm",
                    "train_error_gap",
                    "verdict",
                ],
                markdown=True,
            ),
            "",
        ]
    return lines + [
        f"![learning curves](learning_curves{suffix}.png)",
        "",
        f"![local energy](local_energy{suffix}.png)",
        "",
    ]


def _tuning_section(result: CompareResult) -> list[str]:
    if not result.tuning:
        return []
    rules = {t.get("selection_rule") for arms in result.tuning.values() for t in arms.values()}
    lines = ["## Tuning", ""]
    lines += [f"Selection rule: {rule}." for rule in sorted(rules - {None})] + [""]
    for b, arms in result.tuning.items():
        for arm, t in arms.items():
            sp = t["space"]
            lines += [
                f"### {arm} ({b})",
                "",
                f"- Search: grid {sp['grid']}"
                + (f", then {sp['then']}" if sp["then"] else "")
                + f"; extension cap {sp['max_extend']} per axis",
                f"- {t['n_planned']} planned + {t['n_extension']} extension trials; seeds "
                f"{t['seeds']}; {t['n_val']} validation images",
                f"- Chosen: `{t['chosen']}`"
                + (f"; **on edge**: {', '.join(t['on_edge'])}" if t["on_edge"] else "")
                + ("; **weak selection**" if t.get("weak_selection") else ""),
                "",
                format_table(
                    t["trials"],
                    [
                        "trial",
                        "stage",
                        *sp["grid"],
                        *sp["then"],
                        "val_error",
                        "val_error_se",
                        "val_loss",
                        "tied",
                        "chosen",
                        "failed",
                    ],
                    markdown=True,
                ),
                "",
            ]
    return lines


def _hyperparameter_section(result: CompareResult) -> list[str]:
    lines = [
        "## Hyperparameters",
        "",
        "Settings that differ between optimizers (all settings: `results.json`, `configs`):",
        "",
    ]
    for b in result.settings["budgets"]:
        rows = _differing(result.configs[b])
        if len(rows[0]) > 1:
            lines += [f"{b}:", "", format_table(rows, markdown=True), ""]
        else:
            lines += ["(all optimizers share every setting)", ""]
    return lines


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


def _prereg_lines(s: dict[str, Any]) -> list[str]:
    pre = s.get("preregistered")
    if not pre:
        return ["- No pre-registration in the grid file: every measured variant is shown."]
    n = s.get("n_variants", 0)
    return [
        f"- Pre-registered in the grid file before the run: measures {pre['measures']}, "
        f"sigmas {pre['sigmas']}, targets {pre['targets']}, networks with a final training "
        f"error above {pre['did_not_train']:g} did not train and are excluded.",
        f"- Multiplicity: {n} variants (measure x sigma x target) are tested, all shown; at "
        f"the 5% level about {0.05 * n:.1f} of them would exclude 0 by chance if no measure "
        "correlated. `kendall_p_holm`: Holm-adjusted over the variants.",
    ]


def _excluded_lines(s: dict[str, Any]) -> list[str]:
    exc = s.get("excluded") or []
    if not s.get("preregistered"):
        return []
    if not exc:
        return ["No network was excluded (every one trained).", ""]
    rows = [
        {k: r.get(k) for k in ("run", "optimizer", *s["grid"], "train_error", "test_error")}
        for r in exc
    ]
    return [
        f"## Excluded networks ({len(exc)}: did not train)",
        "",
        format_table(rows, markdown=True),
        "",
    ]


def _study_lines(result: StudyResult, images: list[tuple[str, str]]) -> list[str]:
    """The Markdown lines of a study report."""
    s = result.settings
    cols = correlation_table_columns()
    main = [c for c in result.correlations if c["target"] in result.targets]
    cross = [c for c in result.correlations if c["target"] not in result.targets]
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
        f"- Kendall τ-b and Spearman ρ with scipy p-values and "
        f"{'BCa' if (s.get('preregistered') or {}).get('interval') == 'bca' else 'percentile'}"
        f" bootstrap 95% intervals ({s['n_boot']} resamples of the networks).",
        *_prereg_lines(s),
        "",
        "## Correlation with test error and generalization gap",
        "",
        format_table(main, cols, markdown=True) if main else "(fewer than 3 networks)",
        "",
        *_excluded_lines(s),
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
    return lines


def write_study_report(result: StudyResult) -> dict[str, str]:
    """Write ``report.md``, ``networks.csv``, ``correlations.csv``, ``study.json`` and one
    scatter PNG per flatness measure (``scatter_MEASURE.png``) into ``result.out_dir``."""

    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "networks_csv": str(write_csv(result.records, out / "networks.csv")),
        "correlations_csv": str(write_csv(result.correlations, out / "correlations.csv")),
    }
    labels = {k: measure_label(k) for k in [*result.measures, *result.targets]}
    images = []
    for m in result.measures:
        pts = [r for r in result.records if m in r]
        if not pts:
            continue
        stats = {
            c["target"]: f"Kendall τ = {c['kendall_tau']:.2f} "
            f"[{c['tau_ci_low']:.2f}, {c['tau_ci_high']:.2f}]"
            for c in result.correlations
            if c["measure"] == m and c["target"] in result.targets
        }
        name = f"scatter_{m}.png"
        plot_scatter(pts, m, list(result.targets), out / name, labels=labels, stats=stats)
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
    lines = _study_lines(result, images)
    (out / "report.md").write_text("\n".join(lines))
    files["report"] = str(out / "report.md")
    log.info("wrote study report %s", out / "report.md")
    return files
