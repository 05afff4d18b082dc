"""`flatminima gmm`: argument resolution (--quick never overrides), one-line errors, help on
every flag, the bounded replica-theory solver, imbalanced studies and collapsed fits."""

from __future__ import annotations

import argparse
import csv
import math
import warnings

import numpy as np
import pytest

from flatminima.cli import main
from flatminima.commands.gmm import DEFAULTS, QUICK, build_config, register, resolve
from flatminima.gmm import LinearClassifier, bayes_optimal, classifier_error, hebbian, sample
from flatminima.gmm import experiment as ex
from flatminima.gmm.ranking import kendall_by_alpha


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser


def _gmm_parser() -> argparse.ArgumentParser:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["gmm"]


def test_every_flag_has_help():
    actions = [a for a in _gmm_parser()._actions if a.option_strings]
    assert len(actions) >= 15
    for a in actions:
        assert a.help and a.help.strip() and a.help != argparse.SUPPRESS, a.option_strings


def test_quick_sets_only_the_defaults_the_user_did_not_give():
    p = _parser()
    assert resolve(p.parse_args(["gmm", "--quick"])) == QUICK
    assert resolve(p.parse_args(["gmm"])) == DEFAULTS
    args = p.parse_args(
        ["gmm", "--quick", "--alphas", "2,3", "--n-features", "50", "--theory-max-iter", "7"]
    )
    r = resolve(args)
    assert r["alphas"] == [2.0, 3.0] and r["n_features"] == 50 and r["theory_max_iter"] == 7
    assert r["seeds"] == QUICK["seeds"] and r["epochs"] == QUICK["epochs"]
    cfg = build_config(args)
    assert cfg.alphas == (2.0, 3.0) and cfg.n_features == 50


def test_default_estimators_add_the_bayes_classifier_only_when_imbalanced():
    p = _parser()
    assert "bayes_optimal" not in build_config(p.parse_args(["gmm"])).estimators
    assert "bayes_optimal" in build_config(p.parse_args(["gmm", "--rho", "0.3"])).estimators
    given = build_config(p.parse_args(["gmm", "--rho", "0.3", "--estimators", "hebbian"]))
    assert given.estimators == ("hebbian",)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--alphas=-1"], "alphas"),
        (["--n-features", "0"], "--n-features"),
        (["--alphas", "nan"], "alphas"),
        (["--rho", "1.5"], "rho"),
        (["--delta", "0"], "delta"),
        (["--epochs", "0"], "epochs"),
        (["--seeds", "-2"], "seeds"),
        (["--theory-points", "-1"], "--theory-points"),
        (["--theory-max-iter", "0"], "--theory-max-iter"),
        (["--estimators", "nope"], "nope"),
        (["--alphas", "x"], "--alphas"),
    ],
)
def test_bad_values_give_one_error_line(tmp_path, capsys, argv, needle):
    out = tmp_path / "o"
    try:
        rc = main(["gmm", "--quick", "--no-progress", "--out", str(out), *argv])
    except SystemExit as e:  # a usage error from the parser
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (out / "results.csv").exists()


def test_theory_is_bounded_to_the_study_alphas_and_max_iter():
    cfg = ex.StudyConfig(n_features=100, alphas=(1.0, 4.0), estimators=("square_ridge",))
    curves = ex.theory_curves(cfg, n_points=0, max_iter=40)
    (curve,) = curves.values()
    assert [r.alpha for r in curve] == [1.0, 4.0]
    assert all(r.iterations <= 40 for r in curve)
    assert not curve[0].converged  # square loss at alpha = 1: the interpolation peak
    more = ex.theory_curves(cfg, n_points=4, max_iter=40)["square_ridge"]
    assert [r.alpha for r in more] == pytest.approx([1.0, 4 ** (1 / 3), 4 ** (2 / 3), 4.0])
    with pytest.raises(ValueError, match="max_iter"):
        ex.theory_curves(cfg, max_iter=0)


def test_imbalanced_cell_pairs_gaps_to_the_finite_n_bayes_classifier():
    cfg = ex.StudyConfig(
        n_features=60,
        alphas=(2.0,),
        rho=0.25,
        delta=0.5,
        epochs=2.0,
        estimators=("hebbian", "bayes_optimal", "logistic_ridge", "sgd_loss"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = ex.run_cell(cfg, 2.0, seed=1)
    by = {(r["estimator"], r["stop"]): r for r in rows}
    X, y, v = sample(60, 2.0, 0.5, 0.25, seed=1)
    bo = bayes_optimal(X, y, 0.5, 0.25)
    eps_bayes = classifier_error(bo.w, bo.b, v, 0.5, 0.25)
    for r in rows:
        assert r["gap_bayes"] == pytest.approx(r["eps_g"] - eps_bayes, abs=1e-15)
    assert by[("bayes_optimal", "closed")]["gap_bayes"] == 0.0
    heb = by[("hebbian", "closed")]
    assert heb["gap_heb"] == 0.0 and heb["gap_bayes"] > 0  # b = 0 is not Bayes-optimal here
    assert abs(bo.b) > 0


def test_balanced_gap_bayes_equals_gap_heb():
    cfg = ex.StudyConfig(n_features=40, alphas=(2.0,), epochs=1.0, estimators=("square_ridge",))
    (r,) = ex.run_cell(cfg, 2.0, seed=0)
    assert r["gap_bayes"] == pytest.approx(r["gap_heb"], abs=1e-12)


def test_collapsed_fits_are_flagged_and_no_warning_reaches_the_user(monkeypatch):
    dyn = dict(ex.DYNAMICS)
    dyn["rsgd_loss"] = ("rsgd", "logistic", False, [dict(lr=1e300, gamma=1e6)])  # -> nan
    monkeypatch.setattr(ex, "DYNAMICS", dyn)
    # a classifier that is worse than chance: the Hebbian with its sign flipped
    monkeypatch.setattr(ex, "erm_square", lambda X, y, lam, b: LinearClassifier(-hebbian(X, y).w))
    cfg = ex.StudyConfig(
        n_features=50,
        alphas=(4.0,),
        seeds=(0, 1),
        epochs=2.0,
        estimators=("hebbian", "square_ridge", "rsgd_loss", "sgd_loss"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = [r for s in cfg.seeds for r in ex.run_cell(cfg, 4.0, s)]
        summary = ex.summarize(rows)
        taus = kendall_by_alpha(rows, "sigma_star", n_boot=20)
    flagged = {(r["estimator"], r["collapsed"]) for r in rows}
    assert flagged == {("hebbian", 0), ("square_ridge", 1), ("rsgd_loss", 1), ("sgd_loss", 0)}
    div = [r for r in rows if r["estimator"] == "rsgd_loss"]
    assert all(math.isnan(r["eps_g"]) and math.isnan(r["sigma_star"]) for r in div)
    flipped = [r for r in rows if r["estimator"] == "square_ridge"]
    assert all(r["train_error"] >= ex.collapse_threshold(200) for r in flipped)
    s = {(d["estimator"], d["stop"]): d for d in summary}
    assert s[("rsgd_loss", "val")]["n_collapsed"] == 2 and s[("rsgd_loss", "val")]["n"] == 2
    assert math.isnan(s[("rsgd_loss", "val")]["eps_g"])  # empty group: nan, no warning
    assert s[("hebbian", "closed")]["n_collapsed"] == 0
    # the collapsed fits are left out of the ranking: hebbian + sgd_loss (val, final) remain
    assert taus[0]["n_fits"] == 6 and np.isfinite(taus[0]["tau"])


def test_imbalanced_dynamics_fit_a_bias_and_majority_vote_counts_as_collapsed(monkeypatch):
    # a classifier with a bias that always predicts the majority label errs on the minority
    # fraction: chance for a fit with a bias, so it is flagged; bias-free fits keep chance 1/2
    monkeypatch.setattr(
        ex, "erm_square", lambda X, y, lam, b: LinearClassifier(hebbian(X, y).w * 1e-9, -5.0)
    )
    cfg = ex.StudyConfig(
        n_features=60,
        alphas=(4.0,),
        rho=0.25,
        epochs=4.0,
        estimators=("hebbian", "square_ridge", "rsgd_loss"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = ex.run_cell(cfg, 4.0, seed=2)
    by = {(r["estimator"], r["stop"]): r for r in rows}
    X, y, _ = sample(60, 4.0, 1.0, 0.25, seed=2)
    assert by[("square_ridge", "closed")]["train_error"] == pytest.approx(np.mean(y > 0))
    assert by[("square_ridge", "closed")]["collapsed"] == 1
    assert by[("hebbian", "closed")]["collapsed"] == 0
    rs = by[("rsgd_loss", "final")]
    assert rs["collapsed"] == 0 and rs["gap_bayes"] < by[("hebbian", "closed")]["gap_bayes"]


def test_quick_run_imbalanced_writes_every_column(tmp_path, capsys):
    out = tmp_path / "q"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        rc = main(
            [
                "gmm",
                "--quick",
                "--no-progress",
                "--rho",
                "0.3",
                "--delta",
                "0.7",
                "--alphas",
                "2",
                "--out",
                str(out),
            ]
        )
    assert rc == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {"gap_bayes", "collapsed"} <= set(rows[0])
    assert {r["rho"] for r in rows} == {"0.3"} and {r["delta"] for r in rows} == {"0.7"}
    assert {r["alpha"] for r in rows} == {"2.0"}  # the user's --alphas, not --quick's
    bo = [r for r in rows if r["estimator"] == "bayes_optimal"]
    assert len(bo) == 1 and float(bo[0]["gap_bayes"]) == 0.0
    theory = list(csv.DictReader(open(out / "theory.csv")))
    assert {float(r["alpha"]) for r in theory} == {2.0}  # quick: the study's alphas only
    assert "gap_Bayes_N" in capsys.readouterr().out
