"""Pre-registered correlation study: BCa intervals, every variant, excluded networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from flatminima.studies import correlation_study, load_study_grid, rank_correlation
from flatminima.studies.stats import holm

DIGITS = dict(
    data="digits",
    model="mlp",
    model_kwargs={"hidden": [8]},
    epochs=6,
    batch_size=64,
    train_eval_samples=0,
    eval_batch_size=2048,
    progress=False,
)


def test_bca_interval_matches_scipy_bootstrap_of_kendall_tau():
    rng = np.random.default_rng(2)
    x = rng.normal(size=20)
    y = x + rng.normal(size=20)
    res = rank_correlation(x, y, n_boot=400, seed=3, method="bca")

    def tau(a, b, axis=-1):  # scipy's own tau, one resample at a time (the slow reference)
        a, b = np.moveaxis(a, axis, -1), np.moveaxis(b, axis, -1)
        n = a.shape[-1]  # 20, or 19 for scipy's jackknife
        flat = [stats.kendalltau(u, v)[0] for u, v in zip(a.reshape(-1, n), b.reshape(-1, n))]
        return np.asarray(flat).reshape(a.shape[:-1])

    ref = stats.bootstrap(
        (x, y),
        tau,
        paired=True,
        vectorized=True,
        n_resamples=400,
        method="BCa",
        random_state=3,
    ).confidence_interval
    assert res.kendall_ci == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert res.kendall_ci[0] < res.kendall_tau < res.kendall_ci[1]
    with pytest.raises(ValueError, match="interval method"):
        rank_correlation(x, y, method="normal")


def test_preregistration_is_validated_before_any_training(tmp_path):
    grid = {"base": DIGITS, "grid": {"lr": [0.1]}, "measure": {"sigmas": [0.1, 0.5]}}
    with pytest.raises(ValueError, match="differ from measure.sigmas"):
        load_study_grid({**grid, "preregistered": {"sigmas": [0.5]}})
    with pytest.raises(ValueError, match="sharpness"):
        load_study_grid({**grid, "preregistered": {"measures": ["sharpness"]}})
    with pytest.raises(ValueError, match="did_not_train"):
        load_study_grid({**grid, "preregistered": {"did_not_train": 0}})
    spec = load_study_grid({**grid, "preregistered": {"did_not_train": 0.5}})
    assert spec["preregistered"]["sigmas"] == [0.1, 0.5]
    assert spec["preregistered"]["interval"] == "bca"
    assert "preregistered" in load_study_grid("study-digits-mlp")


def test_study_reports_every_variant_and_lists_excluded_networks(tmp_path):
    grid = {
        "base": DIGITS,
        # lr 1e-6 never trains (training error ~0.9): excluded by the pre-registered threshold
        "grid": {"optimizer": ["sgd", "sam"], "lr": [1e-6, 0.1, 0.3]},
        "measure": {
            "sigmas": [0.1, 0.5],
            "n_draws": 1,
            "n_samples": 200,
            "hessian_samples": 1,
            "free_entropy": False,
        },
        "n_boot": 100,
        "preregistered": {
            "measures": ["local_energy_error", "local_energy_loss"],
            "did_not_train": 0.5,
        },
    }
    res = correlation_study(tmp_path, grid)
    excluded = res.settings["excluded"]
    assert sorted(r["lr"] for r in excluded) == [1e-6, 1e-6]
    assert all(r["train_error"] > 0.5 for r in excluded)
    main = [c for c in res.correlations if c["target"] in ("test_error", "gen_gap")]
    variants = {(c["measure"], c["target"]) for c in main}
    assert variants == {
        (f"local_energy_{k}_s{s}", t)
        for k in ("error", "loss")
        for s in ("0.1", "0.5")
        for t in ("test_error", "gen_gap")
    }
    assert all(c["n"] == 4 and c["interval"] == "bca" for c in main)
    assert [c["kendall_p_holm"] for c in main] == pytest.approx(
        holm([c["kendall_p"] for c in main]), nan_ok=True
    )
    kept = [r for r in res.records if r["train_error"] <= 0.5]
    c0 = main[0]
    ref = stats.kendalltau([r[c0["measure"]] for r in kept], [r[c0["target"]] for r in kept])
    assert c0["kendall_tau"] == pytest.approx(ref[0]) or math.isnan(ref[0])
    report = (tmp_path / "report.md").read_text()
    assert "Excluded networks (2" in report and "Multiplicity: 8 variants" in report
    assert "BCa" in report
