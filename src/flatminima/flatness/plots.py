"""Plots of flatness measures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from flatminima.flatness.local_energy import LocalEnergyResult

logger = logging.getLogger(__name__)

__all__ = ["plot_local_energy"]

_VALID_METRICS = ("error", "loss")


def plot_local_energy(
    results: Mapping[str, LocalEnergyResult] | Sequence[LocalEnergyResult],
    path: str | Path,
    metric: str = "error",
    *,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Write a PNG of ``delta_E`` against ``sigma`` with standard-error bars, one curve per label.

    Args:
        results: ``{label: result}``, or a list of results (labelled ``run 0``, ``run 1``...).
        path: output file (parent folders are created); ``.png`` is the intended format.
        metric: ``"error"`` (train-error increase, as plotted in the paper) or ``"loss"``.
        title: figure title (default describes the metric and noise type).
        dpi: resolution.

    Returns:
        The path written.

    Raises:
        ValueError: unknown ``metric``, no results, or ``metric="error"`` for a result that has
            no error (not a classifier).
    """
    if metric not in _VALID_METRICS:
        raise ValueError(f"metric must be one of {_VALID_METRICS}, got {metric!r}")
    items = (
        list(results.items())
        if isinstance(results, Mapping)
        else [(f"run {i}", r) for i, r in enumerate(results)]
    )
    if not items:
        raise ValueError("results is empty: nothing to plot")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    del plt  # pyplot only to register the backend; the Figure API below keeps no global state
    fig = Figure(figsize=(6.4, 4.4), dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    noises = set()
    for label, r in items:
        if metric == "error":
            if r.delta_error is None or r.delta_error_se is None:
                raise ValueError(
                    f"result {label!r} has no error (classification=False); use metric='loss'"
                )
            y, e = r.delta_error, r.delta_error_se
        else:
            y, e = r.delta_loss, r.delta_loss_se
        err = [0.0 if v != v else v for v in e]  # NaN (one draw) -> no bar
        ax.errorbar(r.sigmas, y, yerr=err, marker="o", markersize=4, capsize=3, label=label)
        noises.add(r.noise)
    noise = noises.pop() if len(noises) == 1 else "mixed"
    ax.set_xlabel(r"noise strength $\sigma$" + (f" ({noise})" if noise != "mixed" else ""))
    ax.set_ylabel(r"$\Delta E_{\mathrm{train}}$ " + ("(error)" if metric == "error" else "(loss)"))
    ax.set_title(title or f"Local energy: train {metric} increase under {noise} weight noise")
    ax.grid(True, alpha=0.3)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.legend(loc="best", frameon=False)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    logger.info("wrote %s", out)
    return out
