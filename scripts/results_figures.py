"""Figures of the README's Results section, drawn from the committed CSVs (docs/results/).

Usage: ``python scripts/results.py --figures`` (or ``python scripts/results_figures.py``).
Writes ``docs/figures/results/*.png``. One colour per optimizer everywhere (the colour of the
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
            ax.scatter([n[col] for n in pts], [100 * n["test_error"] for n in pts], s=36,
                       color=REGISTRY[opt].color, label=R.NAMES[opt], alpha=0.85)
        for n in info["bad"]:
            ax.scatter([n[col]], [100 * n["test_error"]], marker="x", s=60, color="grey",
                       label="excluded: did not train")
            ax.annotate(f"{R.NAMES[n['optimizer']]}, excluded", (n[col], 100 * n["test_error"]),
                        textcoords="offset points", xytext=(6, -12), fontsize=9, color="grey")
        ax.set_yscale("log")
        ax.set_yticks([2, 3, 5, 10, 20, 50, 80])
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label + "  (larger = sharper)", fontsize=11)
        ax.set_ylabel("test error (%)", fontsize=11)
        ax.set_title(
            f"Kendall τ = {r['kendall_tau']:+.2f}, BCa 95% [{r['tau_ci_low']:+.2f}, "
            f"{r['tau_ci_high']:+.2f}], n = {r['n']}", fontsize=11)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=10, loc="upper right")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "digits_local_energy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _col(r: dict) -> str:
    return f"{r['measure']}_s{r['sigma']:g}" if r["sigma"] is not None else r["measure"]


def main(root: Path = ROOT) -> None:
    out = root / "docs/figures/results"
    print(f"wrote {digits_figure(root, out)}")


if __name__ == "__main__":
    main()
