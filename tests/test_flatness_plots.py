"""Tests of flatminima.flatness.plots."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from flatminima.flatness import LocalEnergyResult, plot_local_energy


def _result(scale: float, classification: bool = True) -> LocalEnergyResult:
    sig = [0.0, 0.1, 0.2, 0.4]
    return LocalEnergyResult(
        sigmas=sig,
        delta_loss=[scale * s**2 for s in sig],
        delta_loss_se=[0.0] + [0.01] * 3,
        delta_error=[scale * s for s in sig] if classification else None,
        delta_error_se=([0.0] + [0.005] * 3) if classification else None,
        base_loss=0.1,
        base_error=0.02 if classification else None,
        n_draws=1 if scale > 2 else 10,
        n_samples=100,
    )


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("metric", ["error", "loss"])
def test_writes_png(tmp_path: Path, metric: str) -> None:
    out = plot_local_energy(
        {"SGD": _result(1.0), "rSGD": _result(0.5)},
        tmp_path / "sub" / "le.png",
        metric=metric,
        dpi=50,
    )
    assert out.exists()
    w, h = _png_size(out)
    assert (w, h) == (320, 220)  # 6.4 x 4.4 inches at 50 dpi


def test_list_input_and_nan_stderr(tmp_path: Path) -> None:
    r = _result(3.0)  # pretend one draw: NaN standard errors must not break the plot
    r.delta_error_se = [math.nan] * 4
    out = plot_local_energy([r, _result(1.0)], tmp_path / "a.png")
    assert out.stat().st_size > 1000


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metric"):
        plot_local_energy({"a": _result(1.0)}, tmp_path / "x.png", metric="accuracy")
    with pytest.raises(ValueError, match="empty"):
        plot_local_energy({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="classification=False"):
        plot_local_energy({"a": _result(1.0, classification=False)}, tmp_path / "x.png")
