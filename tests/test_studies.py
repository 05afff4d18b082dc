"""Studies: compare (report, resume, paired statistics), tune, correlation study, presets."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from flatminima.studies import (
    Preset,
    _runs,
    arm_config,
    compare,
    compare_configs,
    correlation_study,
    load_preset,
    load_study_grid,
    paired_difference,
    parse_budget,
    parse_grid,
    rank_correlation,
    select_best,
    summarize,
    tune,
)
from flatminima.studies.correlation import study_points
from flatminima.studies.presets import STUDY_KEYS
from flatminima.train import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "flatminima" / "presets"

TINY = dict(
    data="gmm",
    model="mlp",
    model_kwargs={"hidden": [8]},
    epochs=2,
    batch_size=32,
    lr=0.05,
    train_subset=320,
    train_eval_samples=200,
    eval_batch_size=512,
    progress=False,
)


def tiny_preset(**common) -> Preset:
    return Preset.from_dict(
        {"common": {**TINY, **common}, "esgd": {"inner_steps": 2, "lr": 0.5, "gamma": 1e-2}}
    )


def forbid_work(monkeypatch) -> None:
    """Make any training or flatness measurement fail: a re-run must read everything back."""

    def boom(*args, **kwargs):
        raise AssertionError("work was redone on a resumed study")

    monkeypatch.setattr(_runs, "train", boom)
    for name in ("local_energy", "hessian_trace", "local_free_entropy"):
        monkeypatch.setattr(_runs, name, boom)  # the names _runs measures with


# ---------------------------------------------------------------------------- statistics


def test_summarize_and_paired_difference_match_hand_computation():
    from scipy import stats

    a, b = [0.10, 0.20, 0.15, 0.30], [0.12, 0.25, 0.13, 0.31]
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    res = paired_difference(a, b)
    assert res["n"] == 4
    assert res["mean"] == pytest.approx(mean, abs=1e-15)
    assert res["std"] == pytest.approx(sd, rel=1e-12)
    assert res["se"] == pytest.approx(sd / 2, rel=1e-12)
    assert res["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-10)
    t975 = 3.182446305284263  # Student t quantile, 3 degrees of freedom
    assert res["ci_low"] == pytest.approx(mean - t975 * sd / 2, rel=1e-9)
    s = summarize([1.0, 2.0, 6.0])
    assert (s["mean"], s["std"]) == (3.0, pytest.approx(math.sqrt(7.0)))
    assert math.isnan(summarize([0.5])["std"])
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0], [1.0, 2.0])


def _brute_tau(x, y):
    conc = disc = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        s = np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
        conc += s > 0
        disc += s < 0
    return (conc - disc) / (len(x) * (len(x) - 1) / 2)


def test_rank_correlation_monotone_relation_is_one_with_degenerate_interval():
    x = np.linspace(0, 1, 15)
    res = rank_correlation(x, np.exp(3 * x) + 2, n_boot=200, seed=1)
    assert res.kendall_tau == pytest.approx(1.0) and res.spearman_rho == pytest.approx(1.0)
    assert res.kendall_ci == pytest.approx((1.0, 1.0)) and res.spearman_ci == pytest.approx((1, 1))
    assert res.kendall_p < 1e-6
    neg = rank_correlation(x, -x, n_boot=50)
    assert neg.kendall_tau == pytest.approx(-1.0)


def test_rank_correlation_independent_noise_interval_covers_zero():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=60), rng.normal(size=60)
    res = rank_correlation(x, y, n_boot=500, seed=0)
    assert res.kendall_tau == pytest.approx(_brute_tau(x, y), abs=1e-12)  # no ties: tau-b = tau-a
    assert res.kendall_ci[0] < 0 < res.kendall_ci[1]
    assert res.spearman_ci[0] < 0 < res.spearman_ci[1]
    assert res.kendall_ci[1] - res.kendall_ci[0] > 0.1
    assert res.kendall_p > 0.05
    with pytest.raises(ValueError, match="at least 3"):
        rank_correlation([1.0, 2.0], [1.0, 2.0])


# ---------------------------------------------------------------------------- compare


def _summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def test_compare_end_to_end_report_and_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    preset = tiny_preset(val_size=0.2)
    res = compare(
        out,
        preset=preset,
        optimizers=["sgd", "esgd"],
        seeds=2,
        sigmas=[0.1, 0.5],
        flatness_draws=2,
        flatness_samples=100,
    )
    for name in (
        "report.md",
        "results.json",
        "results.csv",
        "paired.csv",
        "runs.csv",
        "learning_curves.png",
        "local_energy.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "![learning curves](learning_curves.png)" in report
    assert "![local energy](local_energy.png)" in report
    assert "equal gradient evaluations" in report

    # paired seeds: seed s gives both optimizers the same seed (data split, order)
    for s in (0, 1):
        cfgs = [
            yaml.safe_load((out / "runs/grad-evals" / a / f"seed{s}/config.yaml").read_text())
            for a in ("sgd", "esgd")
        ]
        assert cfgs[0]["seed"] == cfgs[1]["seed"] == s
        assert cfgs[1]["inner_steps"] == 2  # the preset's per-optimizer override is recorded
    # table and paired difference against an independent reading of the run folders
    err = {
        a: [
            _summary(out / "runs/grad-evals" / a / f"seed{s}")["final"]["test_error"]
            for s in (0, 1)
        ]
        for a in ("sgd", "esgd")
    }
    rows = {r["optimizer"]: r for r in res.table}
    assert set(rows) == {"sgd", "esgd", "sgd (early-stopped)", "esgd (early-stopped)"}
    assert rows["esgd"]["test_error"] == pytest.approx(np.mean(err["esgd"]))
    assert rows["esgd"]["test_error_std"] == pytest.approx(np.std(err["esgd"], ddof=1))
    es = [
        _summary(out / "runs/grad-evals/sgd" / f"seed{s}")["early_stopped"]["test_error"]
        for s in (0, 1)
    ]
    assert rows["sgd (early-stopped)"]["test_error"] == pytest.approx(np.mean(es))
    (pair,) = [p for p in res.paired if p["reference"] == "sgd" and p["subset"] == "all"]
    d = np.subtract(err["esgd"], err["sgd"])
    assert pair["mean"] == pytest.approx(d.mean())
    assert pair["se"] == pytest.approx(np.std(d, ddof=1) / math.sqrt(2))
    # local energy: cached per run and reported at the chosen sigmas
    flat = json.loads((out / "runs/grad-evals/sgd/seed0/flatness.json").read_text())
    de = flat["local_energy"]["result"]["delta_error"]
    assert flat["local_energy"]["result"]["sigmas"] == [0.1, 0.5]
    assert rows["sgd"]["dE(0.5)"] == pytest.approx(
        np.mean(
            [
                json.loads((out / f"runs/grad-evals/sgd/seed{s}/flatness.json").read_text())[
                    "local_energy"
                ]["result"]["delta_error"][1]
                for s in (0, 1)
            ]
        )
    )
    assert de[1] >= de[0] - 0.05  # more noise, (statistically) no less damage
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["seeds"] == [0, 1] and "configs" in saved
    assert len(saved["curves"]["grad-evals"]["sgd"]["mean"]) == 2  # one point per epoch

    # re-run through the CLI: nothing is retrained or re-measured, the table is printed
    mtimes = {
        p: p.stat().st_mtime_ns for p in out.glob("runs/**/*") if p.suffix in (".pt", ".json")
    }
    forbid_work(monkeypatch)
    from flatminima.cli import main

    preset_file = tmp_path / "p.yaml"
    preset_file.write_text(yaml.safe_dump(preset.to_dict()))
    rc = main(
        [
            "compare",
            "--preset-file",
            str(preset_file),
            "--optimizers",
            "sgd,esgd",
            "--seeds",
            "2",
            "--sigmas",
            "0.1,0.5",
            "--flatness-draws",
            "2",
            "--flatness-samples",
            "100",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    printed = capsys.readouterr().out
    assert "sgd (early-stopped)" in printed and "esgd" in printed


def test_compare_budgets_and_large_batch_configs():
    assert parse_budget("both") == ["grad-evals", "epochs"]
    assert parse_budget("equal-epochs") == ["epochs"]
    with pytest.raises(ValueError, match="flops"):
        parse_budget("flops")
    preset = Preset.from_dict({"common": {**TINY, "batch_size": 16}, "rsgd": {"num_replicas": 4}})
    cfgs = compare_configs(preset, ["sgd", "rsgd"], "epochs", large_batch=True)
    assert cfgs["sgd-large-batch"].batch_size == 64 and cfgs["sgd-large-batch"].optimizer == "sgd"
    assert all(c.budget == "epochs" for c in cfgs.values())
    with pytest.raises(ValueError, match="rsgd"):
        compare_configs(preset, ["sgd"], "epochs", large_batch=True)


def test_compare_survives_a_diverging_optimizer(tmp_path):
    preset = Preset.from_dict({"common": {**TINY, "epochs": 1}, "sam": {"lr": 1e12}})
    res = compare(
        tmp_path,
        preset=preset,
        optimizers=["sgd", "sam"],
        seeds=1,
        sigmas=[0.1],
        flatness_draws=1,
        flatness_samples=50,
    )
    rows = {r["optimizer"]: r for r in res.table}
    assert rows["sam"]["diverged"] == 1 and rows["sgd"]["diverged"] == 0
    assert math.isnan(rows["sam"]["test_error"]) and math.isfinite(rows["sgd"]["test_error"])
    assert (tmp_path / "report.md").is_file()


def test_bad_inputs_raise_value_error_naming_the_value(tmp_path):
    with pytest.raises(ValueError, match="adam"):
        compare(tmp_path, preset=tiny_preset(), optimizers=["sgd", "adam"], seeds=1)
    with pytest.raises(ValueError, match="seeds"):
        compare(tmp_path, preset=tiny_preset(), optimizers=["sgd"], seeds=0)
    with pytest.raises(ValueError, match="sigma"):
        compare(tmp_path, preset=tiny_preset(), optimizers=["sgd"], seeds=1, sigmas=[-0.1])
    assert not any(tmp_path.iterdir())  # nothing trained before validation
    with pytest.raises(ValueError, match="learning_rate"):
        parse_grid("learning_rate=0.1,0.2")
    with pytest.raises(ValueError, match="Empty grid"):
        parse_grid("")
    with pytest.raises(ValueError, match="Empty grid"):
        load_study_grid({"base": TINY, "grid": {}})
    with pytest.raises(ValueError, match="bogus"):
        load_study_grid({"base": {**TINY, "bogus": 1}, "grid": {"lr": [0.1]}})
    with pytest.raises(ValueError, match="colour"):
        load_study_grid({"base": TINY, "grid": {"lr": [0.1]}, "colour": 1})
    with pytest.raises(ValueError, match="adam"):
        tune(tmp_path, optimizer="adam", grid="lr=0.1")
    with pytest.raises(ValueError, match="val_size"):
        tune(tmp_path, optimizer="sgd", grid="lr=0.1,0.2", preset=tiny_preset())
    with pytest.raises(ValueError, match="mostly noise"):
        tune(tmp_path, optimizer="sgd", grid="lr=0.1", preset=tiny_preset(val_size=0.2), seeds=1)
    with pytest.raises(ValueError, match="nope"):
        Preset.from_dict({"common": TINY, "nope": {"lr": 0.1}})
    with pytest.raises(FileNotFoundError, match="no-such-preset"):
        load_preset("no-such-preset")


# ---------------------------------------------------------------------------- tune


class NoTestPeeking(dict):
    """A trial record that fails the test if anything reads a test metric."""

    def __getitem__(self, key):
        if "test" in key:
            raise AssertionError(f"select_best read {key!r}")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if "test" in key:
            raise AssertionError(f"select_best read {key!r}")
        return super().get(key, default)


def test_select_best_uses_validation_only():
    trials = [
        NoTestPeeking(trial=0, lr=0.1, val_error=0.30, val_loss=0.9, test_error=0.05),
        NoTestPeeking(trial=1, lr=0.2, val_error=0.10, val_loss=0.5, test_error=0.40),
        NoTestPeeking(trial=2, lr=0.3, val_error=0.10, val_loss=0.4, test_error=0.50),
        NoTestPeeking(trial=3, lr=0.4, val_error=math.nan, val_loss=0.1, test_error=0.0),
    ]
    assert select_best(trials)["trial"] == 2  # tie on val_error: lower val_loss wins
    with pytest.raises(ValueError, match="validation"):
        select_best([NoTestPeeking(trial=0, val_error=math.nan, val_loss=1.0)])


def test_tune_picks_best_validation_trial_and_writes_preset_fragment(tmp_path):
    out = tmp_path / "tune"
    res = tune(
        out,
        optimizer="sgd",
        grid="lr=0.1,0.3,1e12",
        preset=tiny_preset(val_size=0.25),
        seeds=1,
        allow_weak=True,  # 250 validation images, one seed: allowed here, flagged
    )
    assert res.weak and "Weak selection" in (out / "tune.md").read_text()
    dirs = {t["lr"]: out / "trials" / t["point"] / "seed0" for t in res.trials}
    vals = {lr: _summary(d)["final"]["val_error"] for lr, d in dirs.items() if lr != 1e12}
    assert vals[0.1] != vals[0.3]
    # lr = 1e12 diverges: recorded, never selected, and the tuning goes on
    assert _summary(dirs[1e12])["status"] == "diverged"
    failed = [t for t in res.trials if t["lr"] == 1e12]
    assert math.isnan(failed[0]["val_error"]) and "diverged" in failed[0]["failed"]
    # one seed: the SE is the binomial one on the 250 validation images
    t0 = next(t for t in res.trials if t["lr"] == 0.1)
    e = t0["val_error"]
    assert res.n_val == 250 and t0["val_error_se"] == pytest.approx(math.sqrt(e * (1 - e) / 250))
    assert res.best["val_error"] <= min(vals.values()) + res.best["val_error_se"] + 1e-12
    fragment = yaml.safe_load((out / "best.yaml").read_text())
    assert fragment == {"sgd": {"lr": res.best["lr"]}}
    merged = Preset.from_dict({"common": TINY, **fragment})  # usable as a preset
    assert arm_config(merged, "sgd").lr == res.best["lr"]
    with (out / "trials.csv").open() as fh:
        header = next(csv.reader(fh))
    assert not [h for h in header if "test" in h] and "val_error" in header
    assert "test" not in (out / "tune.md").read_text().replace("test set", "")


# ---------------------------------------------------------------------------- study


def test_correlation_study_measures_reports_and_resumes(tmp_path, monkeypatch):
    grid = {
        "base": {**TINY, "epochs": 1},
        "grid": {"optimizer": ["sgd", "sam"], "lr": [0.005, 0.3]},
        "measure": {
            "sigmas": [0.2],
            "n_draws": 2,
            "n_samples": 100,
            "hessian_samples": 2,
            "free_entropy": "auto",
            "free_entropy_options": {"n_t": 2, "n_chains": 2, "n_steps": 4, "burn_in": 2},
        },
        "n_boot": 50,
    }
    out = tmp_path / "study"
    res = correlation_study(out, grid)
    assert len(res.records) == 4
    assert {r["optimizer"] for r in res.records} == {"sgd", "sam"}
    for r in res.records:
        assert r["gen_gap"] == pytest.approx(r["test_error"] - r["train_error"])
        assert math.isfinite(r["hessian_trace"]) and r["neg_free_entropy"] == r["neg_free_entropy"]
    assert set(res.measures) == {
        "local_energy_error_s0.2",
        "local_energy_loss_s0.2",
        "hessian_trace",
        "neg_free_entropy",
    }
    targets = {(c["measure"], c["target"]) for c in res.correlations}
    assert ("hessian_trace", "test_error") in targets and ("hessian_trace", "gen_gap") in targets
    assert ("neg_free_entropy", "hessian_trace") in targets  # measures against each other
    for m in res.measures:
        assert (out / f"scatter_{m}.png").is_file()
    assert "Kendall" in (out / "report.md").read_text()
    assert (out / "networks.csv").is_file() and (out / "correlations.csv").is_file()

    forbid_work(monkeypatch)
    again = correlation_study(out, grid, write=False)
    assert again.records == res.records
    # a sampled subset and max_runs are deterministic
    spec = load_study_grid({**grid, "sample": 3, "seed": 1})
    assert study_points(spec) == study_points(spec) and len(study_points(spec)) == 3
    assert len(study_points(load_study_grid({**grid, "max_runs": 2}))) == 2


# ---------------------------------------------------------------------------- presets


def test_every_preset_parses_and_builds_configs():
    files = sorted(CONFIGS.glob("*.yaml"))
    names = {f.stem for f in files}
    assert {
        "fashion-quick",
        "fashion-cnn",
        "cifar10-resnet18",
        "cifar10-wrn28-10",
        "cifar100-resnet18",
        "cifar100-wrn28-10",
        "fashion-resnet18-gpu",
        "study-digits-mlp",
    } <= names
    for f in files:
        if f.stem.startswith("study-"):
            spec = load_study_grid(f)
            points = study_points(spec)
            assert len(points) >= 24
            for p in points:
                TrainConfig.from_dict({**spec["base"], **p})
            continue
        preset = load_preset(f.stem)
        assert set(preset.study) <= set(STUDY_KEYS)
        arms = preset.study.get("optimizers") or list(preset.arms)
        for b in parse_budget(preset.study.get("budget", "grad-evals")):
            cfgs = compare_configs(
                preset, arms, b, large_batch=preset.study.get("large_batch", False)
            )
            assert set(arms) <= set(cfgs), f.name
    paper = load_preset("cifar10-resnet18")
    for opt in ("sgd", "esgd", "rsgd", "sam"):
        c = arm_config(paper, opt)
        assert (c.momentum, c.nesterov, c.weight_decay, c.batch_size, c.lr_schedule, c.epochs) == (
            0.9,
            True,
            5e-4,
            128,
            "cosine",
            200,
        )
    assert arm_config(paper, "rsgd").num_replicas == 3
    assert arm_config(paper, "esgd").inner_steps == 5
    assert arm_config(paper, "esgd").gamma_growth == 1e4
    assert arm_config(paper, "sam").rho == 0.05


def test_vectorised_bootstrap_statistics_match_scipy_with_ties():
    from scipy import stats

    from flatminima.studies.correlation import kendall_tau_b_rows, spearman_rho_rows

    rng = np.random.default_rng(3)
    x = rng.integers(0, 5, size=(6, 12)).astype(float)  # many ties
    y = x + rng.integers(0, 3, size=(6, 12))
    taus, rhos = kendall_tau_b_rows(x, y, chunk_elems=200), spearman_rho_rows(x, y)
    for b in range(6):
        assert taus[b] == pytest.approx(stats.kendalltau(x[b], y[b])[0], abs=1e-12)
        assert rhos[b] == pytest.approx(stats.spearmanr(x[b], y[b])[0], abs=1e-12)


def test_compare_parallel_jobs_and_both_budgets_share_sgd_runs(tmp_path):
    """--jobs 2 trains in worker processes and gives the numbers of a serial run; under
    ``both`` budgets SGD (one pass per minibatch) is trained once and reported twice, while
    rSGD gets y times the gradient evaluations at equal epochs per replica."""
    preset = Preset.from_dict({**tiny_preset().to_dict(), "study": {"controls": False}})
    kw = dict(
        preset=preset,
        optimizers=["sgd", "rsgd"],
        seeds=1,
        sigmas=[0.5],
        flatness_draws=1,
        flatness_samples=50,
    )
    par = compare(tmp_path / "par", budget="both", jobs=2, **kw)
    assert not (tmp_path / "par/runs/epochs/sgd").exists()
    assert (tmp_path / "par/runs/epochs/rsgd/seed0/summary.json").is_file()
    ser = compare(tmp_path / "ser", budget="grad-evals", **kw)
    err = {(r["budget"], r["arm"]): r["test_error"] for r in par.runs}
    for r in ser.runs:
        assert err[("grad-evals", r["arm"])] == r["test_error"]
    evals = {(r["budget"], r["arm"]): r["samples"] for r in par.runs}
    assert evals[("epochs", "sgd")] == evals[("grad-evals", "sgd")]
    assert evals[("epochs", "rsgd")] > 1.9 * evals[("grad-evals", "rsgd")]
    with pytest.raises(ValueError, match="jobs"):
        compare(tmp_path / "bad", jobs=0, **kw)
