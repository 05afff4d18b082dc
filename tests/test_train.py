"""The training loop: budgets, schedules, run folders, exact resume after SIGKILL, divergence."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flatminima.data import load_dataset
from flatminima.train import DivergenceError, TrainConfig, Trainer, load_run, train
from flatminima.train.loop import lr_factor

TIME_COLUMNS = {"train_time_s", "eval_time_s"}


def small_cfg(**kw) -> TrainConfig:
    base = dict(
        data="gmm",
        data_kwargs={"num_train": 640, "num_test": 500},
        model="mlp",
        model_kwargs={"hidden": [16]},
        epochs=2,
        batch_size=32,
        lr=0.05,
        progress=False,
        train_eval_samples=200,
        lr_schedule="cosine",
    )
    base.update(kw)
    return TrainConfig.from_dict(base)


def read_metrics(path: Path) -> list[dict[str, str]]:
    with (path / "metrics.csv").open() as fh:
        return [
            {k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in csv.DictReader(fh)
        ]


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "changes, word",
    [
        ({"optimizer": "adam"}, "optimizer"),
        ({"lr": -1.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"mu_decay": 1.0}, "mu_decay"),
        ({"budget": "flops"}, "budget"),
        ({"nesterov": True, "momentum": 0.0}, "nesterov"),
        ({"lr_milestones": [1.5]}, "lr_milestones"),
        ({"bogus_key": 1}, "bogus_key"),
    ],
)
def test_config_rejects_bad_values(changes, word):
    with pytest.raises(ValueError, match=word):
        TrainConfig.from_dict(changes)


def test_config_yaml_round_trip(tmp_path):
    cfg = small_cfg(optimizer="rsgd", num_replicas=2)
    (tmp_path / "c.yaml").write_text(
        "\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.to_dict().items())
    )
    again = TrainConfig.from_yaml(tmp_path / "c.yaml", {"seed": 3})
    assert again.replace(seed=0) == cfg and again.seed == 3


# ---------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    "optimizer, extra",
    [("sgd", {}), ("sam", {}), ("rsgd", {"num_replicas": 3}), ("esgd", {"inner_steps": 4})],
)
def test_equal_grad_eval_budget(optimizer, extra):
    """Under the default budget every algorithm spends the same gradient evaluations."""
    data = load_dataset("gmm", num_train=960, num_test=100)
    cfg = small_cfg(optimizer=optimizer, epochs=6, batch_size=32, **extra)
    trainer = Trainer(cfg, data=data)
    plan = trainer.plan
    assert plan.total_samples == pytest.approx(6 * 960, rel=0.02)
    per_replica_epochs = plan.total_steps * trainer.algo.batches_per_step * 32 / 960
    expected = {"sgd": 6, "sam": 3, "rsgd": 2, "esgd": 6}[optimizer]
    assert per_replica_epochs == pytest.approx(expected, rel=0.02)


def test_equal_epochs_budget_is_per_replica():
    data = load_dataset("gmm", num_train=960, num_test=100)
    cfg = small_cfg(optimizer="rsgd", num_replicas=3, epochs=2, budget="epochs")
    trainer = Trainer(cfg, data=data)
    assert trainer.plan.total_steps == 2 * (960 // 32)
    assert trainer.plan.total_samples == 3 * 2 * 960


def test_lr_schedules():
    data = load_dataset("gmm", num_train=320, num_test=100)
    cfg = small_cfg(
        epochs=10, lr_schedule="step", lr_milestones=[0.5], lr_decay=0.1, warmup_epochs=1
    )
    trainer = Trainer(cfg, data=data)
    f = lr_factor(cfg, trainer.plan)
    spe = trainer.plan.steps_per_epoch
    assert f(0) == pytest.approx(1 / spe) and f(spe - 1) == pytest.approx(1.0)
    assert f(trainer.plan.total_steps // 2 - 1) == 1.0
    assert f(trainer.plan.total_steps // 2) == pytest.approx(0.1)
    cos = lr_factor(cfg.replace(lr_schedule="cosine", warmup_epochs=0), trainer.plan)
    assert cos(0) == 1.0 and cos(trainer.plan.total_steps) == pytest.approx(0.0, abs=1e-12)
    assert cos(trainer.plan.total_steps // 2) == pytest.approx(0.5, abs=0.02)


# ---------------------------------------------------------------------------- run folders


def test_run_folder_contents_and_skip_when_complete(tmp_path):
    cfg = small_cfg(epochs=2)
    summary = train(cfg, tmp_path / "run")
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.yaml", "metrics.csv", "checkpoint.pt", "summary.json"} <= files
    assert summary["status"] == "complete"
    rows = read_metrics(tmp_path / "run")
    assert [int(r["eval_point"]) for r in rows] == [1, 2]
    assert int(rows[-1]["samples"]) == summary["samples"] > 0
    assert float(rows[-1]["test_error"]) < 0.5  # learnt something on an easy mixture
    mtime = (tmp_path / "run" / "checkpoint.pt").stat().st_mtime_ns
    again = train(cfg, tmp_path / "run")  # complete: skipped, nothing rewritten
    assert again["final"] == summary["final"]
    assert (tmp_path / "run" / "checkpoint.pt").stat().st_mtime_ns == mtime


def test_resume_refuses_a_different_config(tmp_path):
    from flatminima.train import ResumeMismatchError

    cfg = small_cfg(epochs=2)
    Trainer(cfg, tmp_path / "run").run(max_eval_points=1)  # one epoch, checkpointed, not finished
    with pytest.raises(ResumeMismatchError, match="lr"):
        train(cfg.replace(lr=0.1), tmp_path / "run")


@pytest.mark.parametrize("optimizer", ["sgd", "esgd", "rsgd", "sam"])
def test_resume_in_process_equals_uninterrupted(tmp_path, optimizer):
    extra = {
        "esgd": {"inner_steps": 2, "gamma": 0.03, "gamma_growth": 10.0, "noise": 1e-3},
        "rsgd": {"num_replicas": 2, "gamma": 0.01, "gamma_growth": 10.0},
    }.get(optimizer, {})
    cfg = small_cfg(optimizer=optimizer, epochs=3, **extra)
    full = train(cfg, tmp_path / "full")
    assert Trainer(cfg, tmp_path / "part").run(max_eval_points=1)["status"] == "incomplete"
    resumed = train(cfg, tmp_path / "part")
    assert read_metrics(tmp_path / "full") == read_metrics(tmp_path / "part")
    assert resumed["final"]["test_error"] == full["final"]["test_error"]


def _train_cmd(out: Path, epochs: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flatminima",
        "train",
        "--data",
        "gmm",
        "--model",
        "mlp",
        "--data-kwargs",
        "num_train=1280,num_test=500,dim=50",
        "--optimizer",
        "esgd",
        "--inner-steps",
        "2",
        "--noise",
        "1e-3",
        "--gamma",
        "0.03",
        "--epochs",
        str(epochs),
        "--batch-size",
        "16",
        "--train-eval-samples",
        "200",
        "--no-progress",
        "--out",
        str(out),
    ]


def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    """A run killed with SIGKILL mid-training and resumed ends with the same metrics."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    epochs = 10
    subprocess.run(
        _train_cmd(tmp_path / "full", epochs), check=True, env=env, capture_output=True, timeout=300
    )
    proc = subprocess.Popen(
        _train_cmd(tmp_path / "killed", epochs),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / "killed" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:  # header + 2 epochs
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows_at_kill = len(metrics.read_text().splitlines()) - 1
    assert 2 <= rows_at_kill < epochs, "the run must be killed part-way"
    assert not (tmp_path / "killed" / "summary.json").exists()
    subprocess.run(
        _train_cmd(tmp_path / "killed", epochs),
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert read_metrics(tmp_path / "full") == read_metrics(tmp_path / "killed")


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = small_cfg(epochs=4, lr=1e-3)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.run(max_eval_points=1)
    good = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    real_loss = trainer.algo.loss
    calls = []

    def poisoned(model, batch):  # a few good steps, then the loss becomes NaN
        calls.append(1)
        loss = real_loss(model, batch)
        return loss * float("nan") if len(calls) > 3 else loss

    trainer.algo.loss = poisoned
    with pytest.raises(DivergenceError, match="nan"):
        trainer.run()
    kept = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert kept["step"] == good["step"]
    for k, v in good["algorithm"]["model"].items():
        assert torch.equal(kept["algorithm"]["model"][k], v)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and "checkpoint" in summary["message"]


def test_load_run_restores_the_model(tmp_path):
    cfg = small_cfg(optimizer="rsgd", num_replicas=2, epochs=1)
    summary = train(cfg, tmp_path / "run")
    trainer = load_run(tmp_path / "run")
    from flatminima.train import evaluate

    center = trainer.algo.eval_models()["center"]
    _, err = evaluate(center, trainer.data.test)
    assert err == pytest.approx(summary["final"]["test_error"])


def test_rsgd_reports_centre_replicas_and_ensemble(tmp_path):
    cfg = small_cfg(optimizer="rsgd", num_replicas=3, epochs=3, gamma=0.01)
    final = train(cfg, tmp_path / "run")["final"]
    for key in (
        "test_error",
        "replica0_test_error",
        "replica2_test_error",
        "replica_mean_test_error",
        "ensemble_test_error",
    ):
        assert 0 <= final[key] <= 1 and math.isfinite(final[key])


@pytest.mark.parametrize("optimizer", ["sgd", "rsgd"])
def test_without_test_evaluation_the_run_is_the_same_but_never_reads_the_test_set(
    tmp_path, optimizer
):
    kw = dict(optimizer=optimizer, val_size=0.2, gamma=0.01, epochs=2)
    full = train(small_cfg(**kw), tmp_path / "full")
    blind = train(small_cfg(**kw, evaluate_test=False), tmp_path / "blind")
    with_test, without = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "blind")
    assert not [k for k in without[0] if "test" in k]
    assert [{k: v for k, v in r.items() if "test" not in k} for r in with_test] == without
    assert math.isnan(blind["early_stopped"]["test_error"])
    assert blind["early_stopped"]["val_error"] == full["early_stopped"]["val_error"]
    with pytest.raises(ValueError, match="evaluate_test=False needs a validation split"):
        small_cfg(evaluate_test=False)


# ---------------------------------------------------------------------------- CLI


def test_cli_train_runs_and_prints_result(tmp_path, capsys):
    from flatminima.cli import main

    rc = main(
        [
            "train",
            "--data",
            "gmm",
            "--model",
            "mlp",
            "--model-kwargs",
            "hidden=8",
            "--epochs",
            "1",
            "--no-progress",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "test error" in out and "run folder" in out
    rc = main(
        ["train", "--data", "gmm", "--model", "mlp", "--model-kwargs", "hidden=8", "--epochs",
         "1", "--no-progress", "--val-size", "0.2", "--no-evaluate-test",
         "--out", str(tmp_path / "v")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "validation error" in out and "test error" not in out
    assert "test_error" not in out and "test_loss" not in out


def test_cli_unknown_names_list_valid_ones(capsys):
    from flatminima.cli import main

    assert main(["train", "--data", "nope", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "fashion-mnist" in err
    assert (
        main(
            [
                "train",
                "--data",
                "gmm",
                "--model",
                "nope",
                "--no-progress",
                "--out",
                "/tmp/flatminima-never",
            ]
        )
        == 1
    )
    assert "resnet18" in capsys.readouterr().err


def test_cli_data_lists_datasets(capsys):
    from flatminima.cli import main

    assert main(["data"]) == 0
    out = capsys.readouterr().out
    for name in ("fashion-mnist", "cifar10", "digits"):
        assert name in out


# ---------------------------------------------------------------------------- real data

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not FMNIST.is_dir() and not os.environ.get("FLATMINIMA_DATA"),
    reason="Fashion-MNIST files not found (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_short_training(tmp_path):
    cfg = TrainConfig(
        data="fashion-mnist",
        model="mlp",
        train_subset=6000,
        epochs=2,
        lr=0.05,
        batch_size=64,
        progress=False,
        train_eval_samples=2000,
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["final"]["test_error"] < 0.25


def test_cli_flatness_measures_a_finished_run(tmp_path, capsys):
    from flatminima.cli import main

    cfg = small_cfg(optimizer="rsgd", num_replicas=2, epochs=1)
    train(cfg, tmp_path / "run")
    rc = main(
        [
            "flatness",
            str(tmp_path / "run"),
            "--sigmas",
            "0,0.5,1",
            "--draws",
            "3",
            "--samples",
            "200",
            "--all-models",
            "--hessian",
            "--hessian-samples",
            "100",
        ]
    )
    assert rc == 0
    out = tmp_path / "run" / "flatness"
    rows = list(csv.DictReader((out / "local_energy.csv").open()))
    assert {r["model"] for r in rows} == {"center", "replica0", "replica1"}
    at_zero = [float(r["delta_error"]) for r in rows if float(r["sigma"]) == 0]
    assert at_zero == [0.0, 0.0, 0.0]  # no noise, no change
    big = [float(r["delta_loss"]) for r in rows if float(r["sigma"]) == 1]
    assert all(b > 0 for b in big)  # strong noise hurts a trained network
    assert (out / "local_energy.png").stat().st_size > 1000
    assert json.loads((out / "hessian.json").read_text())["top_eigenvalue"] > 0
    assert "delta_error" in capsys.readouterr().out


def test_eval_points_are_evenly_spaced_and_cover_the_budget(tmp_path):
    cfg = small_cfg(optimizer="rsgd", num_replicas=2, epochs=2, eval_points=4)
    train(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    steps = [int(r["step"]) for r in rows]
    assert len(rows) == 4 and steps[-1] == 20  # 640 // 32 batches x 2 epochs / 2 replicas
    assert [b - a for a, b in zip([0] + steps, steps)] == [5, 5, 5, 5]


def test_checkpoint_loads_whatever_device_map_location_put_rng_states_on(tmp_path, monkeypatch):
    """torch.load(map_location="cuda") moves the saved CPU RNG states to the GPU; loading must
    bring them back (a bug found on a GPU). Simulated here with a wrapper tensor whose .cpu()
    is the only way back to the real state."""
    cfg = small_cfg(optimizer="esgd", inner_steps=2, epochs=2)
    Trainer(cfg, tmp_path / "run").run(max_eval_points=1)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)

    class Moved:  # stands for a CUDA tensor: usable only after .cpu()
        def __init__(self, t):
            self.t = t

        def cpu(self):
            return self.t

    state["torch_rng"] = Moved(state["torch_rng"])
    gens = state["algorithm"]["optimizer"]["entropy_sgd"]["generators"]
    for k in gens:
        gens[k] = Moved(gens[k])
    trainer = Trainer(cfg, None)
    trainer.load_state_dict(state)
    assert trainer.step == state["step"]


@pytest.mark.parametrize("optimizer", ["sgd", "esgd", "rsgd", "sam"])
def test_bf16_autocast_trains_every_algorithm(tmp_path, optimizer):
    extra = {
        "esgd": {"inner_steps": 2, "scale_by_gamma": False, "lr": 0.5},
        "rsgd": {"num_replicas": 2},
    }.get(optimizer, {})
    summary = train(small_cfg(optimizer=optimizer, amp="bf16", epochs=2, **extra), tmp_path / "r")
    assert summary["status"] == "complete"
    assert math.isfinite(summary["final"]["train_loss"]) and summary["final"]["test_error"] < 0.5


def test_flatness_logged_during_training(tmp_path):
    cfg = small_cfg(
        epochs=3,
        flatness_epochs=[1, -1],
        flatness_sigmas=[0.0, 0.5],
        flatness_draws=2,
        flatness_samples=100,
    )
    train(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    logged = [r.get("local_energy_error_s0.5", "") != "" for r in rows]
    assert logged == [True, False, True]
    assert float(rows[0]["local_energy_error_s0"]) == 0.0
