"""Plots of the studies (matplotlib Figure API on the Agg backend: no display, no global state)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flatminima.optim.registry import REGISTRY
from flatminima.train.run_folder import current_names

log = logging.getLogger(__name__)

__all__ = ["arm_colors", "plot_energy_curves", "plot_learning_curves", "plot_scatter"]

Curves = Mapping[str, Mapping[str, Sequence[float]]]

_TAB10 = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
)


def arm_colors(labels: Sequence[str]) -> dict[str, str]:
    """One colour per label: an optimizer's registry colour (the same in every plot), other
    labels (controls, preset arms) the remaining Tableau colours in order, cycling.

    Example:
        >>> arm_colors(["sam", "sgd-large-batch", "sgd"])
        {'sam': 'tab:red', 'sgd-large-batch': 'tab:purple', 'sgd': 'tab:blue'}
    """
    taken = {spec.color for spec in REGISTRY.values()}
    free = [c for c in _TAB10 if c not in taken] or list(_TAB10)
    out: dict[str, str] = {}
    others = 0
    for label in labels:
        if label in out:
            continue
        if label in REGISTRY:
            out[label] = REGISTRY[label].color
        else:
            out[label] = free[others % len(free)]
            others += 1
    return out


def _figure(width: float = 6.8, height: float = 4.6, ncols: int = 1) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width * ncols, height), dpi=120, layout="constrained")


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    log.info("wrote %s", path)
    return path


def _arm_axes(curves: Curves, what: str) -> tuple[Any, Any, dict[str, str]]:
    """One figure with one axes for curves per arm, and the arms' colours.

    Raises:
        ValueError: no curves (``what`` names them in the message).
    """
    if not curves:
        raise ValueError(f"No {what} curves to plot")
    fig = _figure()
    return fig, fig.add_subplot(1, 1, 1), arm_colors(list(curves))


def _save_arm_axes(
    fig: Any, ax: Any, path: str | Path, xlabel: str, ylabel: str, title: str
) -> Path:
    """Label the axes of :func:`_arm_axes` (legend: the optimizers, mean ± SE) and save."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="optimizer (mean ± SE over seeds)", fontsize=9)
    return _save(fig, path)


def plot_learning_curves(
    curves: Curves, path: str | Path, *, title: str, ylabel: str = "test error"
) -> Path:
    """Test error against samples through backward, mean +- SE band over seeds, one line per arm.

    Args:
        curves: ``{arm: {"samples": [...], "mean": [...], "se": [...]}}`` (the old name
            ``grad_evals`` of ``samples`` is read too).
        path: output PNG.
        title: figure title (say which budget).
        ylabel: y-axis label.

    Raises:
        ValueError: no curves.
    """
    import numpy as np

    fig, ax, colors = _arm_axes(curves, "learning")
    for arm, curve in curves.items():
        c = current_names(curve)
        if not c["samples"]:
            continue
        x, m, s = (np.asarray(c[k], dtype=float) for k in ("samples", "mean", "se"))
        ax.plot(x, m, marker="o", ms=3, label=arm, color=colors[arm])
        ax.fill_between(x, m - s, m + s, color=colors[arm], alpha=0.2, lw=0)
    return _save_arm_axes(fig, ax, path, "samples through backward", ylabel, title)


def plot_energy_curves(
    curves: Curves,
    path: str | Path,
    *,
    title: str,
    ylabel: str = "local energy ΔE (train error increase)",
) -> Path:
    """Local energy ``delta_E(sigma)`` per arm, mean +- SE over seeds (error bars).

    Args:
        curves: ``{arm: {"sigmas": [...], "mean": [...], "se": [...]}}``.
        path: output PNG.
        title: figure title.
        ylabel: y-axis label.

    Raises:
        ValueError: no curves.
    """
    fig, ax, colors = _arm_axes(curves, "local-energy")
    for arm, c in curves.items():
        ax.errorbar(
            c["sigmas"],
            c["mean"],
            yerr=c["se"],
            marker="o",
            ms=4,
            capsize=3,
            label=arm,
            color=colors[arm],
        )
    xlabel = "σ (multiplicative weight noise w(1 + σξ))"
    return _save_arm_axes(fig, ax, path, xlabel, ylabel, title)


def plot_scatter(
    points: Sequence[Mapping[str, Any]],
    measure: str,
    targets: Sequence[str],
    path: str | Path,
    *,
    labels: Mapping[str, str] | None = None,
    stats: Mapping[str, str] | None = None,
    group: str = "optimizer",
) -> Path:
    """One panel per target (test error, generalization gap) against a flatness measure.

    Args:
        points: one mapping per network with the keys ``measure``, each target and ``group``.
        measure: the x-axis key.
        targets: the y-axis keys (one panel each).
        path: output PNG.
        labels: readable axis labels per key.
        stats: per target, a short text (e.g. Kendall tau) shown in the panel title.
        group: the key the points are coloured by.

    Raises:
        ValueError: no points or no targets.
    """
    if not points or not targets:
        raise ValueError("Nothing to plot: need points and at least one target")
    labels = dict(labels or {})
    groups = sorted({str(p.get(group)) for p in points})
    colors = arm_colors(groups)
    fig = _figure(5.2, 4.4, ncols=len(targets))
    axes = fig.subplots(1, len(targets), squeeze=False)[0]
    for ax, target in zip(axes, targets):
        for g in groups:
            sel = [p for p in points if str(p.get(group)) == g]
            ax.scatter(
                [p[measure] for p in sel],
                [p[target] for p in sel],
                s=22,
                alpha=0.8,
                label=g,
                color=colors[g],
            )
        ax.set_xlabel(labels.get(measure, measure))
        ax.set_ylabel(labels.get(target, target))
        title = labels.get(target, target)
        if stats and target in stats:
            title += f"\n{stats[target]}"
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(title=group, fontsize=8)
    fig.suptitle(f"{labels.get(measure, measure)} vs generalization")
    return _save(fig, path)
