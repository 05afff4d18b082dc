"""Tests of the dynamical estimators and the study pipeline of flatminima.gmm."""

from __future__ import annotations

import argparse
import csv

import numpy as np
import pytest

from flatminima.gmm import classifier_error, hebbian, sample
from flatminima.gmm.cli import register
from flatminima.gmm.dynamics import DynamicsConfig, train_linear


def test_rsgd_single_replica_equals_sgd_and_learns():
    X, y, v = sample(50, 4.0, 1.0, seed=0)
    a = train_linear(X, y, DynamicsConfig(algorithm="sgd", epochs=4, n_evals=4), seed=1)
    b = train_linear(
        X,
        y,
        DynamicsConfig(algorithm="rsgd", num_replicas=1, gamma=3.0, epochs=4, n_evals=4),
        seed=1,
    )
    np.testing.assert_array_equal(a.w, b.w)  # y = 1: the coupling vanishes exactly
    assert classifier_error(a.w[-1], 0.0, v, 1.0) < 0.4  # far below chance (0.5)


def test_error_objective_stays_on_sphere_and_learns():
    X, y, v = sample(50, 4.0, 1.0, seed=0)
    for alg in ("rsgd", "esgd"):
        tr = train_linear(
            X,
            y,
            DynamicsConfig(algorithm=alg, objective="error", gamma=1.0, epochs=4, n_evals=3),
            seed=0,
        )
        eps = classifier_error(tr.w[-1], 0.0, v, 1.0)
        assert eps < 0.4, (alg, eps)
    sgd = train_linear(X, y, DynamicsConfig(objective="error", epochs=2, n_evals=2), seed=0)
    np.testing.assert_allclose(np.linalg.norm(sgd.w, axis=1), np.sqrt(50), rtol=1e-10)


def test_config_rejects_bad_values():
    X, y, _ = sample(10, 1.0, 1.0, seed=0)
    for kw, name in [
        (dict(algorithm="adam"), "algorithm"),
        (dict(gamma=-1.0), "gamma"),
        (dict(objective="mse"), "objective"),
        (dict(num_replicas=0), "num_replicas"),
    ]:
        with pytest.raises(ValueError, match=name):
            train_linear(X, y, DynamicsConfig(**kw))


def test_cli_quick_is_resumable(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "gmm"
    args = parser.parse_args(
        [
            "gmm",
            "--quick",
            "--no-progress",
            "--out",
            str(out),
            "--estimators",
            "hebbian,square_ridge,sgd_loss,rsgd_err",
        ]
    )
    assert args.func(args) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["estimator"] for r in rows} == {"hebbian", "square_ridge", "sgd_loss", "rsgd_err"}
    heb = [r for r in rows if r["estimator"] == "hebbian"]
    assert all(float(r["gap_heb"]) == 0.0 for r in heb)
    assert (out / "eps_vs_alpha.png").exists() and (out / "flatness_vs_eps.png").exists()
    assert args.func(args) == 0  # second run: every cell is skipped, nothing appended
    assert len(list(csv.DictReader(open(out / "results.csv")))) == len(rows)
    bad = parser.parse_args(["gmm", "--quick", "--out", str(out), "--estimators", "nope"])
    assert bad.func(bad) == 2
    assert "nope" in capsys.readouterr().err


def test_hebbian_is_scale_free():
    X, y, v = sample(30, 2.0, 1.0, seed=0)
    w = hebbian(X, y).w
    assert classifier_error(3 * w, 0.0, v, 1.0) == pytest.approx(classifier_error(w, 0.0, v, 1.0))
