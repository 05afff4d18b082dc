"""Figures of the README's Results section, drawn from the committed CSVs (docs/results/).

Usage: ``python scripts/results.py --figures`` (or ``python scripts/results_figures.py``).
Writes ``docs/figures/results/*.png`` (``compare_NAME.png`` for every committed compare study
with a ``paired.csv``). One colour per optimizer everywhere (the colour of the
optimizer registry, ``flatminima.optim.registry.REGISTRY[name].color``); networks excluded by
the pre-registered rule are drawn as grey crosses and labelled, never hidden.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

PANELS = (
    ("local_energy_error_s0.3", "local energy ΔE_error(σ=0.3)"),
    ("hessian_trace", "Hessian trace (Hutchinson)"),
)


def digits_figure(root: Path, out: Path) -> Path:
    """Sharpness vs test error of the digits study, excluded networks flagged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)
    import results as R

    from flatminima.optim.registry import REGISTRY

    rows, info = R.digits_correlations(root)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(10, 4.2), constrained_layout=True)
    for ax, (col, label) in zip(axes, PANELS):
        r = next(x for x in rows if _col(x) == col and x["target"] == "test_error")
        for opt in ("sgd", "esgd", "rsgd", "sam"):
            pts = [n for n in info["used"] if n["optimizer"] == opt]
            ax.scatter(
                [n[col] for n in pts],
                [100 * n["test_error"] for n in pts],
                s=36,
                color=REGISTRY[opt].color,
                label=R.NAMES[opt],
                alpha=0.85,
            )
        for n in info["bad"]:
            ax.scatter(
                [n[col]],
                [100 * n["test_error"]],
                marker="x",
                s=60,
                color="grey",
                label="excluded: did not train",
            )
            ax.annotate(
                f"{R.NAMES[n['optimizer']]}, excluded",
                (n[col], 100 * n["test_error"]),
                textcoords="offset points",
                xytext=(6, -12),
                fontsize=9,
                color="grey",
            )
        ax.set_yscale("log")
        ax.set_yticks([2, 3, 5, 10, 20, 50, 80])
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label + "  (larger = sharper)", fontsize=11)
        ax.set_ylabel("test error (%)", fontsize=11)
        ax.set_title(
            f"Kendall τ = {r['kendall_tau']:+.2f}, BCa 95% [{r['tau_ci_low']:+.2f}, "
            f"{r['tau_ci_high']:+.2f}], n = {r['n']}",
            fontsize=11,
        )
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=10, loc="upper right")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "digits_local_energy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _col(r: dict) -> str:
    return f"{r['measure']}_s{r['sigma']:g}" if r["sigma"] is not None else r["measure"]


#: GMM curves: (estimator, stop) -> (label, registry optimizer or colour, line style)
GMM_CURVES = (
    (("sgd_loss", "val"), "SGD", "sgd", "-"),
    (("avg_loss", "val"), "average of 3 uncoupled SGD", "grey", "-"),
    (("rsgd_loss", "val"), "rSGD, finite gamma", "rsgd", "-"),
    (("rsgd_scoped_err", "val"), "rSGD, gamma grown, error-counting", "rsgd", "--"),
    (("esgd_loss", "val"), "eSGD", "esgd", "-"),
)


def gmm_figure(root: Path, out: Path, settings: list[str]) -> Path:
    """Gap to the finite-N Bayes classifier vs alpha, one panel per GMM setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import results as R

    from flatminima.optim.registry import REGISTRY

    fig, axes = plt.subplots(
        1,
        len(settings),
        figsize=(max(6.0, 4.0 * len(settings)), 5.0),
        constrained_layout=True,
        sharey=True,
        squeeze=False,
    )
    for ax, setting in zip(axes[0], settings):
        rows = R.gmm_rows(root, setting)
        meta = R._gmm_meta(rows)
        # balanced: the Hebbian is the Bayes classifier (the zero line); else drawn, b = 0
        extra = [(("hebbian", "closed"), "Hebbian (b = 0)", "black", ":")]
        for key, label, col, ls in (*(extra if meta["rho"] != 0.5 else []), *GMM_CURVES):
            colour = REGISTRY[col].color if col in REGISTRY else col
            stats = [
                R._mean_se(R._gmm_values(rows, *key, a, "gap_bayes", meta["seeds"]))
                for a in meta["alphas"]
            ]
            ax.errorbar(
                meta["alphas"],
                [100 * m for m, _, _ in stats],
                yerr=[100 * (se if se == se else 0) for _, se, _ in stats],
                color=colour,
                ls=ls,
                marker="o",
                ms=4,
                capsize=2,
                label=label,
            )
            for a, (_, _, n) in zip(meta["alphas"], stats):
                if n < len(meta["seeds"]):  # collapsed or missing fits: flagged
                    ax.annotate(f"{n}/{len(meta['seeds'])}", (a, 0), color=colour, fontsize=8)
        ax.axhline(0, color="black", lw=1)
        ax.set_xscale("log")
        ax.set_xticks(meta["alphas"], [f"{a:g}" for a in meta["alphas"]])
        ax.minorticks_off()
        ax.set_xlabel("alpha = P / N", fontsize=11)
        ax.set_title(
            f"Delta = {meta['delta']:g}, rho = {meta['rho']:g} ({len(meta['seeds'])} seeds)",
            fontsize=11,
        )
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test error - Bayes classifier's (pp)", fontsize=11)
    legend: dict[str, object] = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    handles, labels = list(legend.values()), list(legend)
    ncol = 3 if len(settings) > 1 else 2
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=10)
    path = out / "gmm_gap_vs_alpha.png"
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare_figure(root: Path, out: Path, study: str) -> Path:
    """Per-seed paired differences in test error of a fair-protocol compare study, one panel
    per budget, one row per comparison of its ``paired.csv``: dots are seeds in the arm's
    colour (a run flagged collapsed or diverged: grey cross), the bar the mean and its 95 %
    interval, the band the equivalence margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import results as R

    from flatminima.optim.registry import REGISTRY
    from flatminima.studies.stats import paired_test

    d = root / "docs/results" / study
    runs = R.read_csv(d / "runs.csv")
    comps = [c for c in R.read_csv(d / "paired.csv") if c.get("subset", "all") == "all"]
    margin = R._study_margin(d)
    by = {(r["budget"], r["arm"], int(R.fnum(r["seed"]))): r for r in runs}
    budgets = list(dict.fromkeys(c["budget"] for c in comps))
    n_rows = max(sum(c["budget"] == b for c in comps) for b in budgets)
    fig, axes = plt.subplots(
        1, len(budgets), figsize=(10, 1.0 + 0.42 * n_rows), constrained_layout=True, squeeze=False
    )
    for ax, b in zip(axes[0], budgets):
        rows = [c for c in comps if c["budget"] == b]
        for y, c in enumerate(reversed(rows)):
            seeds = sorted(s for (bb, a, s) in by if bb == b and a == c["optimizer"])
            pairs = [(by[(b, c["optimizer"], s)], by.get((b, c["reference"], s))) for s in seeds]
            pairs = [(a, r) for a, r in pairs if r is not None]
            diff = [100 * (R.fnum(a["test_error"]) - R.fnum(r["test_error"])) for a, r in pairs]
            flagged = [a.get("flag", "ok") != "ok" or r.get("flag", "ok") != "ok" for a, r in pairs]
            color = (
                REGISTRY[pairs[0][0].get("optimizer", c["optimizer"])].color if pairs else "grey"
            )
            ok = [x for x, f in zip(diff, flagged) if not f]
            ax.scatter(ok, [y] * len(ok), s=14, color=color, alpha=0.7, zorder=3)
            bad = [x for x, f in zip(diff, flagged) if f]
            ax.scatter(bad, [y] * len(bad), marker="x", color="grey", zorder=3)
            t = paired_test(
                [R.fnum(a["test_error"]) for a, _ in pairs],
                [R.fnum(r["test_error"]) for _, r in pairs],
                margin=margin,
            )
            ax.errorbar(
                100 * t["mean"], y + 0.25, xerr=[[100 * (t["mean"] - t["ci_low"])],
                [100 * (t["ci_high"] - t["mean"])]], fmt="s", color=color, ms=5, capsize=3,
            )  # fmt: skip
        labels = [f"{c['optimizer']} − {c['reference']}" for c in reversed(rows)]
        ax.set_yticks(range(len(rows)), labels)
        ax.axvspan(-100 * margin, 100 * margin, color="0.9", zorder=0)
        ax.axvline(0, color="0.4", lw=0.8)
        ax.set_xlabel("Δ test error, pp")
        ax.set_title(f"{study}: {b}", fontsize=10)
    path = out / f"compare_{study}.png"
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(root: Path = ROOT) -> None:
    import results as R

    out = root / "docs/figures/results"
    print(f"wrote {digits_figure(root, out)}")
    settings = [s for s in R.GMM_SETTINGS if (root / "docs/results" / s / "results.csv").exists()]
    if settings:
        print(f"wrote {gmm_figure(root, out, settings)}")
    for runs in sorted((root / "docs/results").glob("*/paired.csv")):
        print(f"wrote {compare_figure(root, out, runs.parent.name)}")


if __name__ == "__main__":
    main()
