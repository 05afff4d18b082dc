"""Figures of the Gaussian-mixture study (matplotlib, Agg backend).

Readability: estimators are split into three panels (closed forms, dynamics on the logistic
loss, dynamics on the error-counting classifier); within a panel the colour and marker name the
algorithm and the line style the stopping rule (solid: validation-chosen, dashed: end of
budget). Legends sit under each panel.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flatminima.gmm.experiment import as_float
from flatminima.gmm.theory import bayes_optimal_error
from flatminima.optim.registry import REGISTRY

__all__ = ["plot_eps_vs_alpha", "plot_flatness_vs_eps"]

_ALG_STYLE = {  # algorithm prefix -> (colour, marker)
    "hebbian": ("black", "o"),
    "bayes_optimal": ("tab:green", "*"),
    "square_ridge": ("tab:brown", "s"),
    "logistic_ridge": ("tab:purple", "D"),
    "hinge_ridge": ("tab:pink", "^"),
    "max_margin": ("tab:olive", "v"),
    "sgd": (REGISTRY["sgd"].color, "o"),  # optimizers: their colour in every plot
    "avg": ("tab:gray", "s"),
    "rsgd": (REGISTRY["rsgd"].color, "^"),
    "rsgd_scoped": ("tab:red", "v"),
    "esgd": (REGISTRY["esgd"].color, "D"),
}
_PANELS = (
    ("closed form", ""),
    ("dynamics, logistic loss", "_loss"),
    ("dynamics, error-counting", "_err"),
)


def _family(name: str) -> int:
    return 1 if name.endswith("_loss") else 2 if name.endswith("_err") else 0


_ERR_COLOUR = {
    "sgd": "tab:cyan",
    "avg": "goldenrod",
    "rsgd": "lime",
    "rsgd_scoped": "maroon",
    "esgd": "magenta",
}


def _style(name: str) -> tuple[str, str]:
    base = name.rsplit("_", 1)[0] if _family(name) else name
    col, mk = _ALG_STYLE.get(base, ("grey", "x"))
    if _family(name) == 2:  # error-counting: own palette, same marker per algorithm
        col = _ERR_COLOUR.get(base, col)
    return col, mk


def _series(
    summary: Sequence[dict[str, object]], name: str, stop: str, key: str
) -> tuple[list[float], list[float], list[float]]:
    """alpha, 100 x mean and 100 x SE of ``key`` for one fit, sorted by alpha."""
    pts = sorted(
        (float(s["alpha"]), float(s[key]), float(s[key + "_se"]))  # type: ignore[arg-type]
        for s in summary
        if s["estimator"] == name and s["stop"] == stop
    )
    return [p[0] for p in pts], [100 * p[1] for p in pts], [100 * p[2] for p in pts]


def _log_alpha_axis(ax: Any, alphas: list[float]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(alphas, [f"{a:g}" for a in alphas])
    ax.minorticks_off()
    ax.set_xlabel("alpha = P / N")


def _gap_panel(ax: Any, summary: Sequence[dict[str, object]], j: int, alphas: list[float]) -> None:
    """Panel ``j`` of :data:`_PANELS`: gap to eps_BO of its family (and the Hebbian)."""
    ax.axhspan(-0.5, 0.5, color="0.88", zorder=0, label="|gap| < 0.5 pp")
    ax.axhline(0, color="k", lw=1)
    for name, stop in sorted({(str(s["estimator"]), str(s["stop"])) for s in summary}):
        if _family(name) != j and name != "hebbian":
            continue
        col, mk = _style(name)
        a, m, e = _series(summary, name, stop, "gap_bo")
        ax.errorbar(
            a, m, yerr=e, ls="--" if stop == "final" else "-", marker=mk, ms=5,
            lw=2.5 if name == "hebbian" else 1.5, color=col, capsize=2,
            label=name if stop == "closed" else f"{name} ({stop})",
            mfc="white" if stop == "final" else col,
        )  # fmt: skip
    _log_alpha_axis(ax, alphas)
    ax.set_title(_PANELS[j][0])
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)


def _theory_lines(axes: Any, theory: Mapping[str, Sequence[Any]], delta: float, rho: float) -> None:
    """Replica-theory curves: gap in the closed-form panel, eps_g in the absolute panel."""
    for name, pts in theory.items():
        if not pts:
            continue
        col, _ = _style(name)
        ta = [float(r.alpha) for r in pts]
        te = [float(r.eps_g) for r in pts]
        gaps = [100 * (e - bayes_optimal_error(a, delta, rho)) for a, e in zip(ta, te)]
        kw = dict(ls=":", marker=".", color=col, lw=2)
        axes[0].plot(ta, gaps, label=f"{name} (replica theory)", **kw)
        axes[3].plot(ta, [100 * e for e in te], label=f"{name} theory", **kw)


def _absolute_panel(
    ax: Any, summary: Sequence[dict[str, object]], alphas: list[float], delta: float, rho: float
) -> None:
    """eps_g of the Hebbian (and the finite-N Bayes classifier, if run) beside eps_BO(alpha)."""
    grid = np.geomspace(min(alphas) * 0.8, max(alphas) * 1.2, 100)
    eps_bo = [100 * bayes_optimal_error(a, delta, rho) for a in grid]
    ax.plot(grid, eps_bo, "k-", lw=2, label="Bayes-optimal eps_BO")
    for name, col in (("hebbian", "tab:blue"), ("bayes_optimal", "tab:green")):
        a, m, e = _series(summary, name, "closed", "eps_g")
        if a:
            ax.errorbar(a, m, yerr=e, fmt="o", color=col, label=f"{name} (simulation)")
    _log_alpha_axis(ax, alphas)
    ax.set_ylabel("eps_g (%)")
    ax.set_title("absolute error")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))


def plot_eps_vs_alpha(
    summary: Sequence[dict[str, object]],
    delta: float,
    rho: float,
    path: str | os.PathLike[str],
    theory: Mapping[str, Sequence[Any]] | None = None,
) -> None:
    """``eps_g - eps_BO`` (mean +- SE over seeds) against alpha, one panel per family; the
    Hebbian (closed panel) and the 0.5 pp band are drawn in every panel; a fourth panel shows
    ``eps_g`` itself for the Hebbian (and the finite-N Bayes classifier) beside
    ``eps_BO(alpha)``.

    ``theory``: estimator name -> replica-theory points (objects with ``alpha`` and ``eps_g``,
    e.g. :class:`flatminima.gmm.replica.ERMTheory`), drawn as dotted lines in the estimator's
    colour in the closed-form panel and in the absolute-error panel (pass converged points
    only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 5.8), gridspec_kw=dict(width_ratios=[1, 1, 1, 0.8]))
    alphas = sorted({float(s["alpha"]) for s in summary})  # type: ignore[arg-type]
    for j in range(len(_PANELS)):
        _gap_panel(axes[j], summary, j, alphas)
    _theory_lines(axes, theory or {}, delta, rho)
    axes[0].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    axes[0].set_ylabel("eps_g - eps_BO  (pp, mean ± SE over seeds)")
    _absolute_panel(axes[3], summary, alphas, delta, rho)
    fig.suptitle(f"Gaussian mixture, Delta={delta:g}, rho={rho:g}: gap to the Bayes-optimal error")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_flatness_vs_eps(
    rows: Sequence[dict[str, object]],
    path: str | os.PathLike[str],
    taus: Mapping[str, Sequence[dict[str, float]]] | None = None,
) -> None:
    """Per alpha (columns): matched-error ``sigma*``, raw local energy and, when measured, the
    local free entropy (rows) against ``eps_g``, one point per fit (mean ± SE over seeds);
    Kendall tau in the titles if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({float(r["alpha"]) for r in rows})  # type: ignore[arg-type]
    fits = sorted(
        {(str(r["estimator"]), str(r["stop"])) for r in rows}, key=lambda f: (_family(f[0]), f)
    )
    measures: tuple[tuple[str, str], ...] = (
        ("sigma_star", "sigma* at matched train error (flatter ↑)"),
        ("local_energy", "raw local energy dE(0.5) (flatter ↓)"),
    )
    if any(np.isfinite(as_float(r.get("free_entropy"))) for r in rows):
        measures += (("free_entropy", "local free entropy Phi (flatter ↑)"),)
    n_rows = len(measures)
    fig, axes = plt.subplots(
        n_rows, len(alphas), figsize=(3.6 * len(alphas) + 3, 3.5 * n_rows), squeeze=False
    )
    for j, a in enumerate(alphas):
        for name, stop in fits:
            rs = [
                r
                for r in rows
                if as_float(r["alpha"]) == a and r["estimator"] == name and r["stop"] == stop
            ]
            if not rs:
                continue
            col, mk = _style(name)
            eps = 100 * np.array([float(r["eps_g"]) for r in rs])  # type: ignore[arg-type]
            for i, (key, _) in enumerate(measures):
                f = np.array([as_float(r.get(key)) for r in rs])
                f = f[np.isfinite(f)]
                se = lambda x: x.std(ddof=1) / np.sqrt(x.size) if x.size > 1 else 0.0  # noqa: E731
                lab = name if stop == "closed" else f"{name} ({stop})"
                axes[i, j].errorbar(
                    eps.mean(),
                    f.mean() if f.size else np.nan,
                    xerr=se(eps),
                    yerr=se(f) if f.size else 0,
                    marker=mk,
                    color=col,
                    ms=7,
                    ls="none",
                    mfc="white" if stop == "final" else col,
                    label=lab,
                )
        for i, (key, ylab) in enumerate(measures):
            t = ""
            if taus and key in taus:
                for d in taus[key]:
                    if d["alpha"] == a:
                        t = f"\ntau={d['tau']:+.2f} [{d['lo']:+.2f},{d['hi']:+.2f}]"
            axes[i, j].set_title(f"alpha={a:g}{t}", fontsize=9)
            if j == 0:
                axes[i, j].set_ylabel(ylab, fontsize=9)
        axes[n_rows - 1, j].set_xlabel("eps_g (%)")
    handles, labels = axes[0, -1].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=8,
        title="estimator (stop); hollow = end of budget",
    )
    fig.suptitle("Flatness vs generalisation (points: mean ± SE over seeds; tau: Kendall, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
