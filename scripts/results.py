"""Regenerate the results blocks of README.md and docs/*.md from committed per-seed CSVs.

Usage::

    python scripts/results.py            # rewrite every generated block
    python scripts/results.py --check    # exit 1 (and print a diff) when any block differs
    python scripts/results.py --list     # the block names and the files they read
    python scripts/results.py --figures  # also redraw docs/figures/results/*.png (not checked)
    python scripts/results.py --import-compare runs/small-train small-train  # a finished study

A generated block is the text between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``
in one of :data:`DOCS`. Every number in it is computed here from CSVs under ``docs/results/`` (or
``docs/figures/`` for the previous protocol) with the project's own statistics:

* paired comparisons (:mod:`flatminima.studies.stats`): over seeds ``s`` the differences
  ``d_s = x_arm(s) - x_ref(s)``, their mean, the Student-t 95 % interval, the paired t and exact
  sign-flip p-values Holm-adjusted over the comparisons of one table, TOST against the margin,
  and the verdict win / loss / equivalent / unsettled;
* rank correlations (:func:`flatminima.studies.correlation.rank_correlation`, BCa intervals,
  Holm over the pre-registered variants) and the GMM Kendall taus
  (:func:`flatminima.gmm.ranking.kendall_by_alpha`).

Blocks are rendered from small string templates (:data:`TEMPLATES`), never edited by hand.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: files that may hold generated blocks (relative to the repository root)
DOCS = ("README.md", "docs/gmm.md", "docs/study-digits-report.md", "docs/fashion-cnn-cpu-report.md")
MARK = re.compile(r"<!-- results:([\w.-]+) -->\n(.*?)<!-- /results:\1 -->", re.S)
#: the GMM settings of the study (folder under docs/results/) and their README names
GMM_SETTINGS = {
    "gmm-balanced": "balanced, Delta = 1",
    "gmm-rho0.3": "imbalanced (rho = 0.3), Delta = 1",
    "gmm-delta0.5": "balanced, Delta = 0.5",
}
#: estimators shown in the GMM gap tables: (estimator, stop) -> label
GMM_ROWS = {
    ("logistic_ridge", "closed"): "logistic ridge 1e-4",
    ("sgd_loss", "val"): "SGD, logistic, val-stopped",
    ("avg_loss", "val"): "average of 3 uncoupled SGD runs",
    ("rsgd_loss", "val"): "rSGD centre, finite gamma, logistic",
    ("rsgd_scoped_err", "val"): "rSGD centre, gamma grown, error-counting",
    ("esgd_loss", "val"): "eSGD, logistic",
}
#: paired GMM comparisons (arm, reference), validation-stopped fits, on eps_g
GMM_PAIRS = (
    ("rsgd_loss", "sgd_loss"),
    ("rsgd_loss", "avg_loss"),
    ("esgd_loss", "sgd_loss"),
)
NAMES = {
    "sgd": "SGD",
    "esgd": "eSGD",
    "rsgd": "rSGD",
    "sam": "SAM",
    "sgd_loss": "SGD",
    "avg_loss": "uncoupled average",
    "rsgd_loss": "rSGD",
    "esgd_loss": "eSGD",
}
MEASURE_NAMES = {
    "local_energy_error": "local energy, train error",
    "local_energy_loss": "local energy, train loss",
    "hessian_trace": "Hessian trace (Hutchinson)",
    "neg_free_entropy": "minus local free entropy",
}
TEMPLATES = {
    "prev_note": (
        "*Previous protocol* (SGD-only tuning on an evaluated seed, {seeds} seeds, uncorrected "
        "paired t-tests). Only means, standard errors and the paired differences were committed "
        "({files}), not per-seed values, so these rows cannot be re-tested under the fair "
        "protocol and carry no verdict."
    ),
    "digits_head": (
        "{n_all} networks, {n_used} correlated; excluded before any correlation (final training "
        "error above the pre-registered {limit:g}): {excluded}. Kendall tau-b, BCa 95 % "
        "intervals ({n_boot} resamples of the networks), larger measure = sharper; Kendall p "
        "Holm-adjusted over all {m} pre-registered variants ({n_measures} measure/sigma pairs x "
        "{n_targets} targets), every one shown:"
    ),
    "digits_tail": (
        "Multiplicity: with {m} variants, about {expected:.1f} would exclude 0 by chance at the "
        "5 % level if no measure correlated. Holm p < 0.05 and BCa interval excluding 0: "
        "{strong}. Opposite sign (tau < 0 against test error, interval excluding 0): {negative}."
    ),
    "gmm_head": (
        "Setting: N = {n}, Delta = {delta:g}, rho = {rho:g}; {n_seeds} seeds ({seeds}); "
        "{epochs:g} passes of gradient evaluations per dynamical estimator. Gap to the "
        "{ref_name} on the same training set (`gap_bayes`), in pp, mean +- SE over seeds "
        "(validation-stopped dynamics; collapsed fits: {collapsed})."
    ),
}


# ----------------------------------------------------------------------------- formatting
def pct(x: float, nd: int = 2) -> str:
    """A fraction as a percentage: ``pct(0.1234) == '12.34'``; ``'-'`` for NaN."""
    return "-" if not math.isfinite(x) else f"{100 * x:.{nd}f}"


def pp(x: float, nd: int = 2) -> str:
    """A signed difference in percentage points: ``pp(-0.0041) == '-0.41'``."""
    return "-" if not math.isfinite(x) else f"{100 * x:+.{nd}f}"


def pval(p: float) -> str:
    """Two significant digits, ``<0.001`` below 0.001."""
    if not math.isfinite(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.2g}" if p < 0.1 else f"{p:.2f}"


def peq(p: float) -> str:
    """``p=0.031`` or ``p<0.001``."""
    s = pval(p)
    return f"p{s}" if s.startswith("<") else f"p={s}"


def num(x: float, nd: int = 2) -> str:
    return "-" if not math.isfinite(x) else f"{x:.{nd}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def fnum(s: Any) -> float:
    """A CSV cell as a float (empty / missing / unparsable -> NaN)."""
    try:
        return float(s)
    except (TypeError, ValueError):
        return math.nan


def seed_list(seeds: Sequence[int]) -> str:
    s = sorted(seeds)
    if s and s == list(range(s[0], s[-1] + 1)) and len(s) > 2:
        return f"{s[0]}-{s[-1]}"
    return ", ".join(map(str, s))


# ----------------------------------------------------------------------------- paired tests
def paired_table(
    pairs: Sequence[tuple[str, Sequence[float], Sequence[float]]], margin: float
) -> list[dict[str, Any]]:
    """Every statistic of one table of paired comparisons ``(label, a, b)``: ``d = a - b``,
    Holm over the table, TOST at ``margin``, verdicts (:mod:`flatminima.studies.stats`)."""
    from flatminima.studies.stats import add_table_tests, paired_test

    rows = [{"label": lab, **paired_test(a, b, margin=margin)} for lab, a, b in pairs]
    return add_table_tests(rows)


def verdict_cell(r: dict[str, Any]) -> str:
    """``+0.12 [-0.05, +0.30]`` and the verdict in bold when significant."""
    v = r["verdict"]
    v = f"**{v}**" if v in ("win", "loss") else v
    return f"{pp(r['mean'])} [{pp(r['ci_low'])}, {pp(r['ci_high'])}] {v}"


def stats_row(r: dict[str, Any]) -> list[str]:
    return [
        str(r["n"]),
        f"{pp(r['mean'])} [{pp(r['ci_low'])}, {pp(r['ci_high'])}]",
        f"{pval(r['p_t'])} / {pval(r['p_t_holm'])}",
        f"{pval(r['p_perm'])} / {pval(r['p_perm_holm'])}",
        pval(r["p_tost"]),
        r["verdict"],
    ]


STATS_HEADER = (
    "pairs",
    "difference, pp [95 % CI]",
    "t p raw / Holm",
    "sign-flip p raw / Holm",
    "TOST p",
    "verdict",
)


# ----------------------------------------------------------------------------- blocks
def block_fashion_previous(root: Path) -> str:
    """Previous-protocol Fashion-MNIST CNN CPU table, from the committed aggregated CSVs."""
    d = root / "docs/figures/fashion-cnn-cpu"
    res = {(r["budget"], r["optimizer"]): r for r in read_csv(d / "results.csv")}
    paired = {(r["budget"], r["optimizer"], r["reference"]): r for r in read_csv(d / "paired.csv")}
    sgd12 = read_csv(root / "docs/figures/fashion-cnn-cpu-sgd12/results.csv")[0]
    rows = []
    show = [("grad-evals", o) for o in ("sgd", "esgd", "rsgd", "sam")]
    show += [("epochs", o) for o in ("rsgd", "sam")]
    label = {"grad-evals": "equal gradient evaluations", "epochs": "equal epochs per replica"}
    last = None
    for b, o in show:
        r = res[(b, o)]
        pr = paired.get((b, o, "sgd"))
        vs = (
            ""
            if pr is None
            else (
                f"{pp(fnum(pr['diff_test_error']))} +- {pct(fnum(pr['diff_se']))} "
                f"(t {peq(fnum(pr['p_value']))})"
            )
        )
        rows.append(_prev_row(label[b] if b != last else "", o, r, vs))
        last = b
    rows.append(_prev_row("control: SGD for 12 epochs (not paired)", "sgd", sgd12, ""))
    seeds = {r["seeds"] for r in res.values()}
    files = (
        "docs/figures/fashion-cnn-cpu/results.csv, paired.csv, "
        "docs/figures/fashion-cnn-cpu-sgd12/results.csv"
    )
    head = [
        "budget",
        "optimizer",
        "gradient evals",
        "test error %",
        "vs SGD, pp (paired)",
        "dE(0.3)",
        "dE(0.5)",
    ]
    note = TEMPLATES["prev_note"].format(seeds="/".join(sorted(seeds)), files=files)
    return "\n".join([note, "", *table(head, rows)])


def _prev_row(budget: str, opt: str, r: dict[str, str], vs: str) -> list[str]:
    return [
        budget,
        NAMES[opt],
        f"{round(fnum(r['grad_evals']) / 1000)}k",
        f"{pct(fnum(r['test_error']))} +- {pct(fnum(r['test_error_se']))}",
        vs,
        num(fnum(r["dE(0.3)"]), 3),
        num(fnum(r["dE(0.5)"]), 3),
    ]


def _digits_inputs(root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict]:
    """Networks of the digits study split into correlated / excluded, and the grid file."""
    from flatminima.studies.correlation import load_study_grid

    grid = load_study_grid("study-digits-mlp")
    limit = grid["preregistered"]["did_not_train"]
    nets = [
        {k: (v if k in ("run_dir", "optimizer") else fnum(v)) for k, v in r.items()}
        for r in read_csv(root / "docs/results/study-digits/networks.csv")
    ]
    used = [r for r in nets if not r["train_error"] > limit]
    bad = [r for r in nets if r["train_error"] > limit]
    return used, bad, grid


def digits_correlations(root: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every pre-registered variant x target: tau, BCa interval, Kendall p and Holm p."""
    from flatminima.studies.correlation import rank_correlation
    from flatminima.studies.stats import holm

    used, bad, grid = _digits_inputs(root)
    pre = grid["preregistered"]
    variants = []
    for m in pre["measures"]:
        if m.startswith("local_energy_"):
            variants += [(f"{m}_s{s:g}", m, s) for s in pre["sigmas"]]
        else:
            variants.append((m, m, None))
    rows = []
    for col, m, s in variants:
        for t in pre["targets"]:
            c = rank_correlation(
                [r[col] for r in used],
                [r[t] for r in used],
                n_boot=grid.get("n_boot", 1000),
                method=pre["interval"],
            )
            rows.append({"measure": m, "sigma": s, "target": t, **c.to_row()})
    for r, p in zip(rows, holm([r["kendall_p"] for r in rows])):
        r["kendall_p_holm"] = p
    info = dict(
        used=used,
        bad=bad,
        limit=pre["did_not_train"],
        n_boot=grid.get("n_boot", 1000),
        n_measures=len(variants),
        n_targets=len(pre["targets"]),
    )
    return rows, info


def _variant_name(r: dict[str, Any]) -> str:
    name = MEASURE_NAMES[r["measure"]]
    return f"{name}, sigma={r['sigma']:g}" if r["sigma"] is not None else name


def block_digits(root: Path) -> str:
    rows, info = digits_correlations(root)
    excluded = (
        "; ".join(
            f"{NAMES[b['optimizer']]} lr {b['lr']:g} batch {int(b['batch_size'])} (training error "
            f"{pct(b['train_error'], 1)} %, test error {pct(b['test_error'], 1)} %)"
            for b in info["bad"]
        )
        or "none"
    )
    head = TEMPLATES["digits_head"].format(
        n_all=len(info["used"]) + len(info["bad"]),
        n_used=len(info["used"]),
        limit=info["limit"],
        excluded=excluded,
        n_boot=info["n_boot"],
        m=len(rows),
        n_measures=info["n_measures"],
        n_targets=info["n_targets"],
    )
    by = {(_variant_name(r), r["target"]): r for r in rows}
    names = list(dict.fromkeys(_variant_name(r) for r in rows))

    def cell(r: dict[str, Any]) -> str:
        return f"{r['kendall_tau']:+.2f} [{r['tau_ci_low']:+.2f}, {r['tau_ci_high']:+.2f}]"

    body = [
        [
            n,
            cell(by[n, "test_error"]),
            pval(by[n, "test_error"]["kendall_p_holm"]),
            cell(by[n, "gen_gap"]),
            pval(by[n, "gen_gap"]["kendall_p_holm"]),
        ]
        for n in names
    ]
    header = [
        "measure",
        "tau vs test error [BCa 95 %]",
        "Holm p",
        "tau vs gap [BCa 95 %]",
        "Holm p",
    ]
    strong = [r for r in rows if r["kendall_p_holm"] < 0.05 and _excludes0(r)]
    neg = [r for r in rows if r["target"] == "test_error" and r["tau_ci_high"] < 0]
    tail = TEMPLATES["digits_tail"].format(
        m=len(rows),
        expected=0.05 * len(rows),
        strong=_variant_list(strong),
        negative=_variant_list(neg),
    )
    return "\n".join([head, "", *table(header, body), "", tail])


def _excludes0(r: dict[str, Any]) -> bool:
    return r["tau_ci_low"] > 0 or r["tau_ci_high"] < 0


def _variant_list(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "none"
    target = {"test_error": "test error", "gen_gap": "gap"}
    return "; ".join(
        f"{_variant_name(r)} vs {target[r['target']]} (tau {r['kendall_tau']:+.2f})" for r in rows
    )


# ----------------------------------------------------------------------------- GMM
def gmm_rows(root: Path, setting: str) -> list[dict[str, Any]]:
    return [dict(r) for r in read_csv(root / "docs/results" / setting / "results.csv")]


def _gmm_values(
    rows: list[dict[str, Any]], est: str, stop: str, alpha: float, key: str, seeds: Sequence[int]
) -> list[float]:
    """Per-seed values (in ``seeds`` order; NaN where missing or collapsed)."""
    got = {
        int(fnum(r["seed"])): fnum(r[key])
        for r in rows
        if r["estimator"] == est
        and r["stop"] == stop
        and fnum(r["alpha"]) == alpha
        and fnum(r["collapsed"]) != 1.0
    }
    return [got.get(s, math.nan) for s in seeds]


def _gmm_meta(rows: list[dict[str, Any]]) -> dict[str, Any]:
    r0 = rows[0]
    rho = fnum(r0["rho"])
    return dict(
        n=int(fnum(r0["n_features"])),
        delta=fnum(r0["delta"]),
        rho=rho,
        alphas=sorted({fnum(r["alpha"]) for r in rows}),
        seeds=sorted({int(fnum(r["seed"])) for r in rows}),
        ref=("hebbian", "closed") if rho == 0.5 else ("bayes_optimal", "closed"),
        ref_name=(
            "Hebbian estimator (the finite-N Bayes classifier at rho = 0.5)"
            if rho == 0.5
            else "finite-N Bayes-optimal classifier"
        ),
        epochs=max(
            fnum(r["grad_evals"]) / (fnum(r["alpha"]) * fnum(r["n_features"]))
            for r in rows
            if fnum(r["grad_evals"]) > 0
        ),
    )


def _mean_se(vals: Sequence[float]) -> tuple[float, float, int]:
    x = np.asarray(vals, dtype=float)
    x = x[np.isfinite(x)]
    if not x.size:
        return math.nan, math.nan, 0
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return float(x.mean()), se, int(x.size)


def gmm_gap_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    alphas, seeds = meta["alphas"], meta["seeds"]
    header = ["estimator", *[f"alpha={a:g}" for a in alphas]]
    body = [
        [
            "eps_BO (%)",
            *[
                pct(_mean_se(_gmm_values(rows, *meta["ref"], a, "eps_bo", seeds))[0])
                for a in alphas
            ],
        ]
    ]
    ref_label = "Hebbian" if meta["rho"] == 0.5 else "finite-N Bayes classifier"
    body.append(
        [
            f"{ref_label}, eps_g (%)",
            *[pct(_mean_se(_gmm_values(rows, *meta["ref"], a, "eps_g", seeds))[0]) for a in alphas],
        ]
    )
    if meta["rho"] != 0.5:
        body.append(_gap_row(rows, ("hebbian", "closed"), "Hebbian (no bias)", alphas, seeds))
    for key, lab in GMM_ROWS.items():
        body.append(_gap_row(rows, key, lab, alphas, seeds))
    return table(header, body)


def _gap_row(
    rows: list[dict[str, Any]],
    key: tuple[str, str],
    label: str,
    alphas: Sequence[float],
    seeds: Sequence[int],
) -> list[str]:
    cells = []
    for a in alphas:
        m, se, n = _mean_se(_gmm_values(rows, *key, a, "gap_bayes", seeds))
        cells.append(f"{pp(m)} +- {pct(se)}" + (f" ({n}/{len(seeds)})" if n < len(seeds) else ""))
    return [label, *cells]


def gmm_paired(
    rows: list[dict[str, Any]], meta: dict[str, Any], margin: float
) -> list[dict[str, Any]]:
    """Paired eps_g tests of :data:`GMM_PAIRS` at every alpha, Holm over the whole table."""
    pairs = []
    for arm, ref in GMM_PAIRS:
        for a in meta["alphas"]:
            pairs.append(
                (
                    (arm, ref, a),
                    _gmm_values(rows, arm, "val", a, "eps_g", meta["seeds"]),
                    _gmm_values(rows, ref, "val", a, "eps_g", meta["seeds"]),
                )
            )
    return paired_table(pairs, margin)


def gmm_collapsed(rows: list[dict[str, Any]]) -> str:
    """The collapsed fits, grouped by (estimator, stop, alpha) with their seeds."""
    bad = [r for r in rows if fnum(r["collapsed"]) == 1.0]
    if not bad:
        return f"none of {len(rows)}"
    groups: dict[tuple[str, str, float], list[int]] = {}
    for r in bad:
        key = (r["estimator"], r["stop"], fnum(r["alpha"]))
        groups.setdefault(key, []).append(int(fnum(r["seed"])))
    return f"{len(bad)} of {len(rows)}: " + "; ".join(
        f"{e} ({s}) at alpha {a:g}, seed{'s' if len(v) > 1 else ''} {seed_list(v)}"
        for (e, s, a), v in groups.items()
    )


def gmm_ranks(
    rows: list[dict[str, Any]], meta: dict[str, Any], measure: str
) -> dict[float, tuple[int, int]]:
    """Rank (1 = flattest) of the reference estimator among all fits by seed-mean flatness."""
    from flatminima.gmm.ranking import FLATNESS_MEASURES

    sign = FLATNESS_MEASURES[measure]
    fits = sorted({(r["estimator"], r["stop"]) for r in rows})
    out = {}
    for a in meta["alphas"]:
        vals = {f: _mean_se(_gmm_values(rows, *f, a, measure, meta["seeds"]))[0] for f in fits}
        ok = {f: sign * v for f, v in vals.items() if math.isfinite(v)}
        ref = ok.get(meta["ref"], math.nan)
        out[a] = (1 + sum(v > ref for v in ok.values()), len(ok))
    return out


def gmm_closest(rows: list[dict[str, Any]], meta: dict[str, Any], within: float = 0.005) -> str:
    """Which validation-stopped dynamical rows of :data:`GMM_ROWS` come within ``within``
    (mean gap) of the reference, and the smallest mean gap of any of them."""
    best = (math.inf, "", 0.0)
    inside = []
    for (est, stop), label in GMM_ROWS.items():
        if stop != "val":
            continue
        for a in meta["alphas"]:
            m = _mean_se(_gmm_values(rows, est, stop, a, "gap_bayes", meta["seeds"]))[0]
            if m < best[0]:
                best = (m, label, a)
            if m < within:
                inside.append(f"{label} at alpha {a:g} ({pp(m)} pp)")
    return (
        f"Dynamical estimators with a mean gap below {100 * within:g} pp: "
        f"{'; '.join(inside) or 'none'}; the smallest mean gap: {pp(best[0])} pp "
        f"({best[1]}, alpha {best[2]:g})."
    )


def gmm_verdicts(tests: list[dict[str, Any]]) -> str:
    """One sentence per comparison: the alphas grouped by verdict."""
    parts = []
    for arm, ref in GMM_PAIRS:
        by: dict[str, list[str]] = {}
        for r in tests:
            if r["label"][:2] == (arm, ref):
                by.setdefault(r["verdict"], []).append(f"{r['label'][2]:g}")
        groups = [f"{v} at alpha {', '.join(a)}" for v, a in by.items()]
        parts.append(f"{NAMES[arm]} - {NAMES[ref]}: {'; '.join(groups)}")
    return "Verdicts: " + ". ".join(parts) + "."


def block_gmm(root: Path, setting: str, margin: float = 0.003) -> str:
    from flatminima.gmm.ranking import kendall_by_alpha

    rows = gmm_rows(root, setting)
    meta = _gmm_meta(rows)
    head = TEMPLATES["gmm_head"].format(
        n=meta["n"],
        delta=meta["delta"],
        rho=meta["rho"],
        n_seeds=len(meta["seeds"]),
        seeds=seed_list(meta["seeds"]),
        epochs=meta["epochs"],
        ref_name=meta["ref_name"],
        collapsed=gmm_collapsed(rows),
    )
    out = [head, "", *gmm_gap_table(rows, meta), "", gmm_closest(rows, meta), ""]
    tests = gmm_paired(rows, meta, margin)
    out.append(
        f"Paired test error (same training set), validation-stopped fits, difference in pp "
        f"[95 % CI] and verdict (Holm over these {len(tests)} comparisons, t and sign-flip; "
        f"TOST margin {100 * margin:g} pp):"
    )
    out.append("")
    header = ["comparison", *[f"alpha={a:g}" for a in meta["alphas"]]]
    body = []
    for arm, ref in GMM_PAIRS:
        cells = [verdict_cell(r) for r in tests if r["label"][:2] == (arm, ref)]
        body.append([f"{NAMES[arm]} - {NAMES[ref]}", *cells])
    out += [*table(header, body), "", gmm_verdicts(tests), ""]
    ref_short = "Hebbian" if meta["rho"] == 0.5 else "Bayes classifier"
    header = ["flatness measure", *[f"alpha={a:g}" for a in meta["alphas"]]]
    body = []
    for measure, lab in (
        ("sigma_star", "sigma* (matched training error)"),
        ("local_energy", "raw local energy, sigma=0.5"),
    ):
        taus = kendall_by_alpha(rows, measure, n_boot=1000, seed=0)
        ranks = gmm_ranks(rows, meta, measure)
        body.append(
            [f"tau, {lab}", *[f"{t['tau']:+.2f} [{t['lo']:+.2f}, {t['hi']:+.2f}]" for t in taus]]
        )
        body.append(
            [
                f"{ref_short}'s flatness rank, {lab}",
                *[f"{ranks[a][0]} of {ranks[a][1]}" for a in meta["alphas"]],
            ]
        )
    out.append(
        "Does flatness rank the fits by test error? Kendall tau-b between flatness (larger = "
        "flatter) and eps_g across the fits (estimator x stopping rule, seed means, collapsed "
        "fits left out), 95 % bootstrap over seeds (1000 resamples); and where the "
        f"{ref_short} falls among them (1 = flattest):"
    )
    out += ["", *table(header, body)]
    return "\n".join(out)


def block_gmm_full(root: Path, setting: str, margin: float = 0.003) -> str:
    """All statistics of the paired GMM comparisons (docs/gmm.md)."""
    rows = gmm_rows(root, setting)
    meta = _gmm_meta(rows)
    tests = gmm_paired(rows, meta, margin)
    body = [
        [f"{NAMES[r['label'][0]]} - {NAMES[r['label'][1]]}", f"{r['label'][2]:g}", *stats_row(r)]
        for r in tests
    ]
    header = ["comparison", "alpha", *STATS_HEADER]
    return "\n".join(table(header, body))


# ----------------------------------------------------------------------------- compare studies
def block_compare(root: Path, study: str, margin: float | None = None) -> str:
    """Fair-protocol ``compare`` study from its committed ``runs.csv`` (one row per run):
    per budget, test error mean +- SE per arm and every paired comparison of the study's
    ``paired.csv`` recomputed from the per-seed values (Holm over one budget's table)."""
    d = root / "docs/results" / study
    runs = read_csv(d / "runs.csv")
    paired = read_csv(d / "paired.csv")
    if margin is None:
        margin = _study_margin(d)
    out = []
    for b in dict.fromkeys(r["budget"] for r in runs):
        for subset, key in (("all", "test_error"), ("early-stopped", "early_stopped_test_error")):
            comps = [c for c in paired if c["budget"] == b and c.get("subset", "all") == subset]
            if comps:
                out += compare_budget(runs, comps, b, margin, key)
    if (d / FLATNESS_FILE).exists() and (d / "flatness_tests.csv").exists():
        out += compare_flatness(d, margin)
    return "\n".join(out).rstrip("\n")


def compare_flatness(d: Path, margin: float) -> list[str]:
    """Paired local-energy tables: per budget, one row per (arm, reference, against) and one
    column per sigma, ``mean difference in pp (Holm sign-flip p)`` as the study's
    ``flatness_tests.csv`` gives them. The rows on the final networks are recomputed from the
    per-seed ``flatness.csv`` first (mean and raw sign-flip p); any difference is an error."""
    from flatminima.studies.stats import paired_test

    dE: dict[tuple[str, str, float], dict[int, float]] = {}
    for r in read_csv(d / FLATNESS_FILE):
        key = (r["budget"], r["arm"], fnum(r["sigma"]))
        dE.setdefault(key, {})[int(fnum(r["seed"]))] = fnum(r["local_energy_error"])
    tests = read_csv(d / "flatness_tests.csv")
    for t in tests:
        if t["against"] != "final":
            continue
        sig = fnum(t["sigma"])
        a, ref = dE[(t["budget"], t["optimizer"], sig)], dE[(t["budget"], t["reference"], sig)]
        seeds = sorted(set(a) & set(ref))
        got = paired_test([a[s] for s in seeds], [ref[s] for s in seeds], margin=margin)
        if not (
            math.isclose(got["mean"], fnum(t["mean"]), abs_tol=1e-12)
            and math.isclose(got["p_perm"], fnum(t["p_perm"]), abs_tol=1e-12)
        ):
            raise SystemExit(
                f"{d}/flatness_tests.csv: {t['budget']} {t['optimizer']} - {t['reference']} at "
                f"sigma {sig:g} does not recompute from {FLATNESS_FILE}"
            )
    out = []
    for b in dict.fromkeys(t["budget"] for t in tests):
        rows = [t for t in tests if t["budget"] == b]
        sigmas = sorted({fnum(t["sigma"]) for t in rows})
        cells: dict[tuple[str, str, str], dict[float, str]] = {}
        for t in rows:
            cell = f"{pp(fnum(t['mean']))} ({pval(fnum(t['p_perm_holm']))})"
            cells.setdefault((t["optimizer"], t["reference"], t["against"]), {})[
                fnum(t["sigma"])
            ] = cell
        out += [
            f"Budget: {b}. Paired local energy dE(sigma) (arm - reference; negative = flatter), "
            "pp of training error, with the Holm-adjusted sign-flip p of the study's "
            "flatness table; *matched* compares with SGD at its evaluation point of closest "
            "training error:",
            "",
        ]
        body = [
            [a, ref, "final" if ag == "final" else "matched", *(c.get(s, "") for s in sigmas)]
            for (a, ref, ag), c in cells.items()
        ]
        out += table(["arm", "reference", "networks", *(f"sigma {s:g}" for s in sigmas)], body)
        out += [""]
    return out


def _study_margin(d: Path) -> float:
    """The margin fixed in the study (``results.json`` settings), else the default 0.3 pp."""
    import json

    from flatminima.studies.stats import DEFAULT_MARGIN

    for name in ("settings.json", "results.json"):
        path = d / name
        if path.exists():
            data = json.loads(path.read_text())
            m = fnum(data.get("settings", data).get("margin"))
            if math.isfinite(m):
                return m
    return DEFAULT_MARGIN


COMPARE_FILES = ("runs.csv", "paired.csv", "results.csv", "flatness_tests.csv")
FLATNESS_FILE = "flatness.csv"  # per-seed local energy, written from results.json on import


def import_compare(root: Path, run_dir: Path, name: str) -> Path:
    """Copy a finished ``compare`` output folder's per-seed CSVs to ``docs/results/NAME/`` and
    its settings (margin, seeds, budgets, tuning choices) to ``settings.json``.

    Raises:
        SystemExit: a file is missing (the study has not finished).
    """
    import json
    import shutil

    missing = [f for f in (*COMPARE_FILES, "results.json") if not (run_dir / f).exists()]
    if missing:
        raise SystemExit(f"{run_dir}: missing {', '.join(missing)} (has the study finished?)")
    dest = root / "docs/results" / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in COMPARE_FILES:
        shutil.copyfile(run_dir / f, dest / f)
    full = json.loads((run_dir / "results.json").read_text())
    keep = {k: full.get(k) for k in ("settings", "configs", "tuning")}
    preset = (keep.get("settings") or {}).get("preset")
    if isinstance(preset, str) and "/src/flatminima/presets/" in preset:
        # a built-in preset: its path in the repository, not on the machine that ran it
        keep["settings"]["preset"] = "src/flatminima/presets/" + Path(preset).name
    (dest / "settings.json").write_text(json.dumps(keep, indent=1, default=str) + "\n")
    rows = [
        {
            "budget": r["budget"],
            "arm": r["arm"],
            "seed": r["seed"],
            "sigma": s,
            "local_energy_error": e,
        }
        for r in full.get("runs", [])
        if isinstance(r, dict)
        for s, e in zip(r.get("local_energy_sigmas") or [], r.get("local_energy_error") or [])
    ]
    if rows:
        with (dest / FLATNESS_FILE).open("w", newline="") as fh:
            w = csv.DictWriter(fh, list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return dest


def compare_budget(
    runs: list[dict[str, str]],
    comps: list[dict[str, str]],
    budget: str,
    margin: float,
    key: str = "test_error",
) -> list[str]:
    """Table rows of one budget (see :func:`block_compare`): the final networks
    (``key="test_error"``) or the early-stopped ones (``"early_stopped_test_error"``, each
    run's network at its evaluation point of lowest validation error, tested as a family of
    its own)."""
    te: dict[str, dict[int, float]] = {}
    flags: dict[str, list[str]] = {}
    for r in runs:
        if r["budget"] != budget:
            continue
        ok = r.get("status", "complete") == "complete"
        val = fnum(r[key]) if ok else math.nan
        te.setdefault(r["arm"], {})[int(fnum(r["seed"]))] = val
        flags.setdefault(r["arm"], []).append(r.get("flag", "ok") or "ok")
    pairs = []
    for c in comps:
        a, ref = te.get(c["optimizer"], {}), te.get(c["reference"], {})
        seeds = sorted(set(a) & set(ref))
        pairs.append(
            ((c["optimizer"], c["reference"]), [a[s] for s in seeds], [ref[s] for s in seeds])
        )
    tests = paired_table(pairs, margin)
    arms = [
        [
            arm,
            f"{len(v)}",
            _arm_cell(list(v.values())),
            f"{sum(f != 'ok' for f in flags[arm])}/{len(flags[arm])}",
        ]
        for arm, v in te.items()
    ]
    what = (
        "Test error per arm"
        if key == "test_error"
        else "Early stopping on the validation split: test error of every run's network at "
        "its evaluation point of lowest validation error, per arm"
    )
    out = [
        f"Budget: {budget}. {what} (mean +- SE over seeds; runs flagged "
        f"collapsed or diverged / all):",
        "",
    ]
    out += table(["arm", "seeds", "test error %", "flagged"], arms) + [""]
    out += [
        f"Paired differences in test error (arm - reference), Holm over these {len(tests)} "
        f"comparisons, TOST margin {100 * margin:g} pp:",
        "",
    ]
    body = [[a, r, *stats_row(t)] for t in tests for a, r in [t["label"]]]
    return out + table(["arm", "reference", *STATS_HEADER], body) + [""]


def _arm_cell(vals: list[float]) -> str:
    m, se, _ = _mean_se(vals)
    return f"{pct(m)} +- {pct(se)}"


# ----------------------------------------------------------------------------- registry
def blocks(root: Path) -> dict[str, Callable[[], str]]:
    """Every known block name -> its renderer (a block is rendered only where it is used)."""
    out: dict[str, Callable[[], str]] = {
        "fashion-cnn-cpu-previous": lambda: block_fashion_previous(root),
        "digits": lambda: block_digits(root),
    }
    for s in GMM_SETTINGS:
        out[s] = lambda s=s: block_gmm(root, s)
        out[s + "-tests"] = lambda s=s: block_gmm_full(root, s)
    results = root / "docs/results"
    for d in sorted(results.glob("*/runs.csv")) if results.is_dir() else []:
        out["compare-" + d.parent.name] = lambda n=d.parent.name: block_compare(root, n)
    return out


def render(text: str, known: dict[str, Callable[[], str]], cache: dict[str, str]) -> str:
    """``text`` with the body of every generated block replaced by its rendering."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in known:
            raise SystemExit(f"unknown results block {name!r}; known: {', '.join(known)}")
        if name not in cache:
            cache[name] = known[name]().rstrip("\n")
        return f"<!-- results:{name} -->\n{cache[name]}\n<!-- /results:{name} -->"

    return MARK.sub(sub, text)


def run(root: Path, check: bool) -> int:
    """Rewrite (or, with ``check``, compare) every generated block; returns the exit status."""
    known, cache, status = blocks(root), {}, 0
    for rel in DOCS:
        path = root / rel
        if not path.exists():
            continue
        old = path.read_text()
        new = render(old, known, cache)
        if new == old:
            continue
        if check:
            status = 1
            sys.stdout.writelines(
                difflib.unified_diff(
                    old.splitlines(True),
                    new.splitlines(True),
                    f"{rel} (committed)",
                    f"{rel} (generated)",
                )
            )
        else:
            path.write_text(new)
            print(f"updated {rel}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a block differs")
    ap.add_argument("--list", action="store_true", help="list the block names")
    ap.add_argument("--figures", action="store_true", help="also redraw docs/figures/results")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root (tests)")
    ap.add_argument(
        "--import-compare",
        nargs=2,
        metavar=("RUN_DIR", "NAME"),
        help="copy a finished compare folder's CSVs to docs/results/NAME and exit",
    )
    args = ap.parse_args(argv)
    if args.import_compare:
        run_dir, name = args.import_compare
        dest = import_compare(args.root, Path(run_dir), name)
        print(f"copied to {dest}; add <!-- results:compare-{name} --> ... to the README")
        return 0
    if args.list:
        for name in blocks(args.root):
            print(name)
        return 0
    if args.figures:
        import results_figures  # noqa: PLC0415  (scripts/ sibling, needs matplotlib)

        results_figures.main(args.root)
    return run(args.root, args.check)


if __name__ == "__main__":
    sys.exit(main())
