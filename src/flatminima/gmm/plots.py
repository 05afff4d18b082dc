"""Figures of the Gaussian-mixture study (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from flatminima.gmm.theory import bayes_optimal_error

__all__ = ["plot_eps_vs_alpha", "plot_flatness_vs_eps"]


def _label(s: dict[str, object]) -> str:
    return f"{s['estimator']}" + ("" if s["stop"] == "closed" else f" ({s['stop']})")


def plot_eps_vs_alpha(
    summary: Sequence[dict[str, object]], delta: float, rho: float, path: str | os.PathLike[str]
) -> None:
    """eps_g (mean +- SE over seeds) against alpha for every estimator, beside eps_BO(alpha)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    labels = sorted({_label(s) for s in summary}, key=lambda x: x)
    alphas = sorted({float(s["alpha"]) for s in summary})  # type: ignore[arg-type]
    grid = np.geomspace(min(alphas) * 0.8, max(alphas) * 1.2, 100)
    axes[0].plot(
        grid, [bayes_optimal_error(a, delta, rho) for a in grid], "k-", lw=2, label="Bayes-optimal"
    )
    axes[1].axhline(0.0, color="k", lw=2, label="Bayes-optimal")
    axes[1].axhspan(-0.005, 0.005, color="0.9")
    for i, lab in enumerate(labels):
        pts = sorted((float(s["alpha"]), s) for s in summary if _label(s) == lab)  # type: ignore[arg-type]
        a = [x for x, _ in pts]
        style = "--" if "(final)" in lab else "-"
        for ax, key in ((axes[0], "eps_g"), (axes[1], "gap_bo")):
            m = [float(s[key]) for _, s in pts]  # type: ignore[arg-type]
            e = [float(s[key + "_se"]) for _, s in pts]  # type: ignore[arg-type]
            ax.errorbar(
                a, m, yerr=e, fmt=style, marker="o", ms=3, label=lab, color=f"C{i % 10}", alpha=0.85
            )
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("alpha = P / N")
    axes[0].set_ylabel("eps_g (exact)")
    axes[1].set_ylabel("eps_g - eps_BO (band: 0.5 pp)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Gaussian mixture, Delta={delta}, rho={rho}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_flatness_vs_eps(rows: Sequence[dict[str, object]], path: str | os.PathLike[str]) -> None:
    """Per alpha: raw local energy and matched-error sigma* against eps_g, one point per fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({float(r["alpha"]) for r in rows})  # type: ignore[arg-type]
    labels = sorted({_label(r) for r in rows})
    fig, axes = plt.subplots(2, len(alphas), figsize=(3.2 * len(alphas), 6.5), squeeze=False)
    for j, a in enumerate(alphas):
        for i, lab in enumerate(labels):
            rs = [r for r in rows if float(r["alpha"]) == a and _label(r) == lab]  # type: ignore[arg-type]
            eps = [float(r["eps_g"]) for r in rs]  # type: ignore[arg-type]
            for k, key in enumerate(("local_energy", "sigma_star")):
                axes[k, j].scatter(
                    eps,
                    [float(r[key]) for r in rs],
                    s=10,
                    color=f"C{i % 10}",  # type: ignore[arg-type]
                    marker="o" if "final" not in lab else "x",
                    label=lab,
                )
        axes[0, j].set_title(f"alpha={a:g}")
        axes[1, j].set_xlabel("eps_g")
    axes[0, 0].set_ylabel("raw local energy dE(sigma)")
    axes[1, 0].set_ylabel("sigma* at matched train error (flatter ->)")
    axes[0, -1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
