"""Tests of the dynamical estimators and the study pipeline of flatminima.gmm."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest

from flatminima.commands.gmm import register
from flatminima.gmm import classifier_error, hebbian, sample


def test_cli_quick_is_resumable(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "gmm"
    args = parser.parse_args(
        [
            "gmm",
            "--quick",
            "--no-progress",
            "--free-entropy",
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
    assert all(np.isfinite(float(r["free_entropy"])) for r in rows)
    assert (out / "eps_vs_alpha.png").exists() and (out / "flatness_vs_eps.png").exists()
    taus = json.load(open(out / "kendall.json"))
    assert {d["alpha"] for d in taus["sigma_star"]} == {1.0, 4.0}
    assert {d["alpha"] for d in taus["free_entropy"]} == {1.0, 4.0}
    # one seed: no bootstrap interval
    assert all(np.isnan(d["lo"]) for d in taus["sigma_star"])
    theory = list(csv.DictReader(open(out / "theory.csv")))
    assert {r["estimator"] for r in theory} == {"square_ridge"}  # the only ERM estimator run
    assert {1.0, 4.0} <= {float(r["alpha"]) for r in theory}
    printed = capsys.readouterr().out
    assert "Replica theory" in printed and "free_entropy" in printed
    assert args.func(args) == 0  # second run: every cell is skipped, nothing appended
    assert len(list(csv.DictReader(open(out / "results.csv")))) == len(rows)
    bad = parser.parse_args(["gmm", "--quick", "--out", str(out), "--estimators", "nope"])
    assert bad.func(bad) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_refuses_results_of_another_version(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "gmm"
    out.mkdir()
    (out / "results.csv").write_text("n_features,delta,rho,alpha,seed,estimator\n")
    args = parser.parse_args(["gmm", "--quick", "--no-progress", "--out", str(out)])
    assert args.func(args) == 2
    assert "new --out folder" in capsys.readouterr().err


def test_hebbian_is_scale_free():
    X, y, v = sample(30, 2.0, 1.0, seed=0)
    w = hebbian(X, y).w
    assert classifier_error(3 * w, 0.0, v, 1.0) == pytest.approx(classifier_error(w, 0.0, v, 1.0))


# --- vectorised dynamics (flatminima.gmm.fastdyn) and the ranking statistic -------------------

from scipy import stats  # noqa: E402
from scipy.special import expit  # noqa: E402

from flatminima.gmm.fastdyn import run_grid  # noqa: E402
from flatminima.gmm.ranking import kendall_by_alpha  # noqa: E402


def test_fastdyn_full_batch_step_is_gradient_descent_on_logistic_loss():
    X, y, _ = sample(40, 2.0, 1.0, seed=3)
    p, n = X.shape
    r = run_grid(X, y, "sgd", "logistic", [dict(lr=0.7)], epochs=1, steps_per_epoch=1, n_evals=1)
    # independent reconstruction: same initialisation, one exact full-batch gradient step
    u0 = np.random.default_rng([0, 12]).standard_normal(n) / np.sqrt(n)
    eta = 0.7 * p / (n * np.mean(np.sum(X * X, 1)) / n)
    h = (X * y[:, None]) @ u0
    grad = -(expit(-h) * y) @ X / p
    np.testing.assert_allclose(r.w[-1, 0], np.sqrt(n) * (u0 - eta * grad), rtol=1e-12)
    assert r.grad_evals == p


def test_fastdyn_grid_configs_are_independent_and_replicas_count_in_budget():
    X, y, v = sample(60, 3.0, 1.0, seed=1)
    grid = [dict(lr=0.2, gamma=0.3), dict(lr=1.0, gamma=3.0)]
    both = run_grid(X, y, "rsgd", "logistic", grid, epochs=6, num_replicas=3, seed=2)
    one = run_grid(X, y, "rsgd", "logistic", grid[1:], epochs=6, num_replicas=3, seed=2)
    np.testing.assert_allclose(both.w[:, 1], one.w[:, 0], rtol=1e-12)
    assert abs(both.grad_evals - 6 * len(y)) <= 3 * 9  # rounding to whole steps of y*B samples
    assert classifier_error(both.w[-1, 1], 0.0, v, 1.0) < 0.4


def test_fastdyn_error_objective_tangent_gradient_matches_finite_differences():
    # with lr -> tiny, one step moves u along -(I - u u^T) grad E; compare to central differences
    X, y, _ = sample(20, 2.0, 1.0, seed=0)
    p, n = X.shape
    lr = 1e-6
    r = run_grid(
        X, y, "sgd", "error", [dict(lr=lr, temp1=1.0)], epochs=1, steps_per_epoch=1, n_evals=1
    )
    u0 = np.random.default_rng([0, 12]).standard_normal(n) / np.sqrt(n)
    u0 /= np.linalg.norm(u0)
    E = lambda u: np.mean(expit(-((X * y[:, None]) @ u) / np.linalg.norm(u)))  # noqa: E731
    g = np.array([(E(u0 + 1e-6 * e) - E(u0 - 1e-6 * e)) / 2e-6 for e in np.eye(n)])
    eta = lr * p / (np.sum(X * X) / p)
    step = (r.w[-1, 0] / np.sqrt(n) - u0) / -eta
    np.testing.assert_allclose(step, g - (g @ u0) * u0, rtol=1e-3, atol=1e-8)
    np.testing.assert_allclose(np.linalg.norm(r.w[-1, 0]), np.sqrt(n), rtol=1e-12)


def test_fastdyn_rejects_bad_arguments():
    X, y, _ = sample(10, 1.0, 1.0, seed=0)
    for kw, name in [
        (dict(algorithm="adam"), "algorithm"),
        (dict(objective="mse"), "objective"),
        (dict(grid=[dict(lr=-1.0)]), "lr"),
        (dict(grid=[dict(lr=1.0, gamma=-1.0)]), "gamma"),
        (dict(grid=[dict(lr=1.0, beta=2.0)]), "keys"),
        (dict(epochs=0.0), "epochs"),
        (dict(num_replicas=0), "num_replicas"),
    ]:
        args = dict(algorithm="sgd", objective="logistic", grid=[dict(lr=1.0)]) | kw
        extra = {k: args.pop(k) for k in ("epochs", "num_replicas") if k in args}
        with pytest.raises(ValueError, match=name):
            run_grid(X, y, args["algorithm"], args["objective"], args["grid"], **extra)


def test_kendall_by_alpha_matches_scipy_and_detects_perfect_order():
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(4):
        for j in range(6):
            eps = 0.2 + 0.01 * j + 0.001 * rng.standard_normal()
            rows.append(
                dict(
                    alpha=1.0,
                    seed=seed,
                    estimator=f"e{j}",
                    stop="closed",
                    eps_g=eps,
                    sigma_star=1.0 - 0.1 * j,
                    local_energy=float(rng.random()),
                )
            )
    (res,) = kendall_by_alpha(rows, "sigma_star", n_boot=200)
    assert res["tau"] == pytest.approx(-1.0) and res["lo"] == pytest.approx(-1.0)
    (res2,) = kendall_by_alpha(rows, "local_energy", n_boot=50)
    le = [np.mean([r["local_energy"] for r in rows if r["estimator"] == f"e{j}"]) for j in range(6)]
    ep = [np.mean([r["eps_g"] for r in rows if r["estimator"] == f"e{j}"]) for j in range(6)]
    assert res2["tau"] == pytest.approx(stats.kendalltau(-np.array(le), ep).statistic)
    with pytest.raises(ValueError, match="measure"):
        kendall_by_alpha(rows, "hessian")
