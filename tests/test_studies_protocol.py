"""The fair comparison protocol: equal-effort tuning, controls, collapsed runs, executors."""

from __future__ import annotations

import csv
import json
import math

import pytest

from flatminima.studies import Preset, _runs, compare
from flatminima.studies.compare import _matched_energy, control_label
from flatminima.studies.executors import SerialExecutor, make_executor
from flatminima.studies.tune import SearchSpace, _step_beyond, planned_trials, tune
from flatminima.train import TrainConfig, Trainer

DIGITS = dict(
    data="digits",
    model="mlp",
    model_kwargs={"hidden": [16]},
    epochs=2,
    batch_size=64,
    lr=0.1,
    val_size=0.2,
    train_eval_samples=0,
    eval_batch_size=2048,
    progress=False,
)
SPACE = {"sgd": {"lr": [0.05, 0.1]}, "sam": {"rho": [0.01, 0.05]}}


def digits_preset(study=None, **common) -> Preset:
    return Preset.from_dict({"study": study or {}, "common": {**DIGITS, **common}})


def forbid_training(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(_runs, "train", boom)


def test_step_beyond_and_planned_trials():
    assert _step_beyond([0.01, 0.1], 0.1) == pytest.approx(1.0)  # geometric step
    assert _step_beyond([0.01, 0.1], 0.01) == pytest.approx(0.001)
    assert _step_beyond([0.01, 0.1, 1.0], 0.1) is None  # interior
    assert _step_beyond([0.0, 0.5], 0.0) == pytest.approx(-0.5)  # arithmetic through zero
    assert (
        _step_beyond([0.1], 0.1) is None and _step_beyond(["same", "independent"], "same") is None
    )
    base = TrainConfig(optimizer="esgd", inner_lr=0.1)
    space = SearchSpace.parse(
        {"lr": [0.5, 1.0], "gamma": [0.01, 0.1], "then": {"inner_lr": [0.05, 0.1, 0.2]}}
    )
    assert planned_trials(space, base) == 4 + 2  # inner_lr 0.1 is the chosen point's own
    with pytest.raises(ValueError, match="seed"):
        SearchSpace.parse({"seed": [1, 2]})


def test_tune_extends_edges_refuses_weak_selection_and_resumes(tmp_path, monkeypatch):
    p = digits_preset(epochs=1)
    with pytest.raises(ValueError, match="mostly noise"):
        tune(tmp_path / "weak", optimizer="sgd", grid="lr=0.05,0.1", preset=p, seeds=1)
    out = tmp_path / "t"
    # lr = 1e-6 stays at chance: that trial fails (collapsed), the best is on the top edge
    res = tune(out, optimizer="sgd", grid="lr=1e-6,0.01", preset=p, seeds=[5, 6, 7])
    by_lr = {t["lr"]: t for t in res.trials}
    assert "collapsed" in by_lr[1e-6]["failed"] and math.isnan(by_lr[1e-6]["val_error"])
    assert res.n_planned == 2 and res.n_extension >= 1
    assert [t["stage"] for t in res.trials][:2] == ["grid", "grid"]
    ext = [t["lr"] for t in res.trials if t["stage"] == "extension"]
    assert 1 <= len(ext) <= 2  # the cap
    assert ext[0] == pytest.approx(0.01 * (0.01 / 1e-6))  # one grid step beyond the top edge
    # the selection rule, recomputed from the records
    ok = [t for t in res.trials if not t["failed"]]
    best = min(ok, key=lambda t: t["val_error"])
    tied = [t for t in ok if t["val_error"] <= best["val_error"] + best["val_error_se"]]
    assert {t["trial"] for t in res.trials if t["tied"]} == {t["trial"] for t in tied}
    assert res.best["trial"] == min(tied, key=lambda t: t["val_loss"])["trial"]
    saved = json.loads((out / "tuning.json").read_text())
    assert saved["chosen"] == {"lr": res.best["lr"]} and saved["seeds"] == [5, 6, 7]
    assert len(saved["trials"]) == len(res.trials) and "selection_rule" in saved
    with (out / "trials.csv").open() as fh:
        header = next(csv.reader(fh))
    assert "val_error_se" in header and not [h for h in header if "test" in h]
    for run in (out / "trials").glob("*/seed*"):  # the trials never evaluated the test set
        with (run / "metrics.csv").open() as fh:
            assert not [h for h in next(csv.reader(fh)) if "test" in h], run
    assert saved["base_config"]["evaluate_test"] is False
    forbid_training(monkeypatch)  # resumable: every trial run is reused
    again = tune(out, optimizer="sgd", grid="lr=1e-6,0.01", preset=p, seeds=[5, 6, 7])
    assert again.chosen == res.chosen


def test_compare_refuses_overlapping_seeds_and_unequal_effort(tmp_path):
    study = {"tuning": {"seeds": [1, 2, 3], "space": SPACE}}
    with pytest.raises(ValueError, match="overlap the evaluation seeds"):
        compare(tmp_path, preset=digits_preset(study), optimizers=["sgd", "sam"], seeds=2)
    unequal = {"tuning": {"seeds": [7, 8, 9], "space": {**SPACE, "sam": {"rho": [0.01]}}}}
    with pytest.raises(ValueError, match="Unequal tuning effort"):
        compare(tmp_path, preset=digits_preset(unequal), optimizers=["sgd", "sam"], seeds=2)
    with pytest.raises(ValueError, match="margin"):
        compare(tmp_path, preset=digits_preset(), optimizers=["sgd"], seeds=1, margin=-1.0)
    assert not any(tmp_path.iterdir())  # refused before any training


def test_compare_tunes_every_arm_then_evaluates_with_the_chosen_values(tmp_path):
    study = {"tuning": {"seeds": 3, "max_extend": 0, "space": SPACE}, "margin": 0.01}
    res = compare(
        tmp_path,
        preset=digits_preset(study),
        optimizers=["sgd", "sam"],
        seeds=2,
        sigmas=[0.5],
        flatness_draws=1,
        flatness_samples=100,
    )
    for arm in ("sgd", "sam"):
        t = json.loads((tmp_path / f"tuning/grad-evals/{arm}/tuning.json").read_text())
        assert t["seeds"] == [2, 3, 4] and t["n_planned"] == 2  # after the evaluation seeds
        assert res.configs["grad-evals"][arm] | t["chosen"] == res.configs["grad-evals"][arm]
        assert res.configs["grad-evals"][arm].get("evaluate_test", True)  # evaluation runs do
    report = (tmp_path / "report.md").read_text()
    assert "## Tuning" in report and "tied" in report and "p_perm_holm" in report
    (row,) = [r for r in res.paired if r["subset"] == "all"]
    assert row["verdict"] in ("win", "loss", "equivalent", "unsettled")
    assert res.settings["margin"] == 0.01 and res.settings["tuning_seeds"] == [2, 3, 4]


def test_collapsed_run_is_flagged_and_controls_are_generated(tmp_path):
    preset = Preset.from_dict(
        {"common": {**DIGITS, "epochs": 1}, "sam": {"lr": 1e-6}, "rsgd": {"num_replicas": 2}}
    )
    res = compare(
        tmp_path,
        preset=preset,
        optimizers=["sgd", "rsgd", "sam"],
        seeds=2,
        budget="epochs",
        sigmas=[0.5],
        flatness_draws=1,
        flatness_samples=100,
    )
    rows = {r["optimizer"]: r for r in res.table}
    assert rows["sam"]["collapsed"] == "2/2" and rows["sgd"]["collapsed"] == "0/2"
    assert math.isnan(rows["sam"]["test_error_without_collapsed"])
    with (tmp_path / "runs.csv").open() as fh:
        flags = {(r["arm"], r["seed"]): r["flag"] for r in csv.DictReader(fh)}
    assert flags[("sam", "0")] == "collapsed" and flags[("sgd", "0")] == "ok"
    assert "collapsed" in (tmp_path / "report.md").read_text()
    assert {r["subset"] for r in res.paired} == {"all", "without collapsed", "early-stopped"}
    # compute-matched SGD for every multi-pass arm, the large-batch control for rSGD
    evals = {r["optimizer"]: r["samples"] for r in res.table if r.get("samples")}
    assert evals[control_label("rsgd")] == evals["rsgd"] == 2 * evals["sgd"]
    assert evals[control_label("sam")] == evals["sam"] == 2 * evals["sgd"]
    assert rows["sgd-large-batch"]["optimizer"] == "sgd-large-batch"
    refs = {(r["optimizer"], r["reference"]) for r in res.paired}
    assert ("rsgd", control_label("rsgd")) in refs and ("rsgd", "sgd-large-batch") in refs
    assert {r["against"] for r in res.flatness_tests} == {"final", "matched train error"}


def test_early_stopped_networks_form_their_own_family_of_tests(tmp_path):
    preset = Preset.from_dict({"common": {**DIGITS, "epochs": 3}, "rsgd": {"num_replicas": 2}})
    res = compare(
        tmp_path,
        preset=preset,
        optimizers=["sgd", "rsgd"],
        seeds=3,
        budget="epochs",
        sigmas=[0.5],
        flatness_draws=1,
        flatness_samples=100,
    )
    labels = ["sgd", "rsgd", control_label("rsgd"), "sgd-large-batch"]

    def early(label):  # an independent reading of the run folders
        return [
            json.loads((tmp_path / "runs/epochs" / label / f"seed{s}/summary.json").read_text())[
                "early_stopped"
            ]["test_error"]
            for s in range(3)
        ]

    rows = {r["optimizer"]: r for r in res.table}
    for label in labels:
        assert rows[f"{label} (early-stopped)"]["test_error"] == pytest.approx(
            sum(early(label)) / 3
        )
    fam = [r for r in res.paired if r["subset"] == "early-stopped"]
    assert {(r["optimizer"], r["reference"]) for r in fam} == {
        (r["optimizer"], r["reference"]) for r in res.paired if r["subset"] == "all"
    }
    (row,) = [r for r in fam if r["reference"] == control_label("rsgd")]
    d = [a - b for a, b in zip(early("rsgd"), early(control_label("rsgd")))]
    assert row["mean"] == pytest.approx(sum(d) / 3)
    # Holm within the family: the smallest p is multiplied by the family's size, not more
    first = min(fam, key=lambda r: r["p_t"])
    assert first["p_t_holm"] == pytest.approx(min(1.0, len(fam) * first["p_t"]))
    assert "lowest validation error" in (tmp_path / "report.md").read_text()
    # without a validation split there is no early-stopped row or family
    plain = compare(
        tmp_path / "plain",
        preset=Preset.from_dict({"common": {**DIGITS, "epochs": 1, "val_size": 0}}),
        optimizers=["sgd", "sam"],
        seeds=2,
        sigmas=[0.5],
        flatness_draws=1,
        flatness_samples=100,
    )
    assert not [r for r in plain.table if "early-stopped" in r["optimizer"]]
    assert {r["subset"] for r in plain.paired} == {"all"}


def test_a_preset_large_batch_arm_keeps_its_own_tuned_values(tmp_path):
    preset = Preset.from_dict(
        {
            "study": {
                "tuning": {
                    "seeds": 3,
                    "max_extend": 0,
                    "space": {
                        "sgd": {"lr": [0.02, 0.05]},
                        "sgd-large-batch": {"lr": [0.3, 0.6]},
                        "rsgd": {"lr": [0.3, 0.6]},
                    },
                }
            },
            "common": {**DIGITS, "epochs": 3},
            "rsgd": {"num_replicas": 2},
            "sgd-large-batch": {"optimizer": "sgd", "batch_size": 128},
        }
    )
    res = compare(
        tmp_path,
        preset=preset,
        optimizers=["sgd", "sgd-large-batch", "rsgd"],
        seeds=1,
        sigmas=[0.5],
        flatness_draws=1,
        flatness_samples=100,
    )
    pairs = {(r["optimizer"], r["reference"]) for r in res.paired}
    assert pairs == {("sgd-large-batch", "sgd"), ("rsgd", "sgd"), ("rsgd", "sgd-large-batch")}
    cfg = res.configs["grad-evals"]["sgd-large-batch"]
    chosen = json.loads((tmp_path / "tuning/grad-evals/sgd-large-batch/tuning.json").read_text())
    assert cfg["lr"] == chosen["chosen"]["lr"] in (0.3, 0.6)
    assert cfg["batch_size"] == 128 and res.configs["grad-evals"]["sgd"]["lr"] in (0.02, 0.05)


def test_controls_can_be_tuned_at_their_own_budget_with_sgds_search(tmp_path):
    space = {"sgd": {"lr": [0.02, 0.3]}, "sam": {"rho": [0.01, 0.05]}}
    study = {"tuning": {"seeds": 3, "max_extend": 0, "space": space, "controls": "tuned"}}
    res = compare(
        tmp_path,
        preset=digits_preset(study, epochs=1),
        optimizers=["sgd", "sam"],
        seeds=1,
        budget="epochs",
        sigmas=[0.5],
        flatness_draws=1,
        flatness_samples=100,
    )
    label = control_label("sam")
    own = json.loads((tmp_path / f"tuning/epochs/{label}/tuning.json").read_text())
    sgd = json.loads((tmp_path / "tuning/epochs/sgd/tuning.json").read_text())
    assert own["n_planned"] == sgd["n_planned"] == 2 and own["seeds"] == sgd["seeds"]
    assert own["base_config"]["epochs"] == 2 and own["base_config"]["evaluate_test"] is False
    assert res.configs["epochs"][label]["lr"] == own["chosen"]["lr"]
    assert res.configs["epochs"][label]["epochs"] == 2  # still the control's budget
    assert res.settings["control_tuning"] == "tuned" and label in res.tuning["epochs"]
    assert "tuned at their own budget" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="study.tuning.controls"):
        bad = {"tuning": {**study["tuning"], "controls": "yes"}}
        compare(tmp_path / "bad", preset=digits_preset(bad), optimizers=["sgd"], seeds=1)


def test_matched_training_error_rule():
    hist = [
        {"train_error": 0.50, "local_energy_error_s0.5": 0.9},
        {"train_error": 0.20, "local_energy_error_s0.5": 0.5},
        {"train_error": 0.10, "local_energy_error_s0.5": 0.3},
        {"train_error": 0.30, "local_energy_error_s0.5": 0.7},
    ]
    assert _matched_energy({"history": hist}, 0.12, 0.5) == pytest.approx((0.3, 0.02))
    # equally close (0.20 and 0.30 from 0.25): the later point
    assert _matched_energy({"history": hist}, 0.25, 0.5) == pytest.approx((0.7, 0.05))
    assert math.isnan(_matched_energy({"history": []}, 0.1, 0.5)[0])


def test_submitit_local_equals_local_pool_and_resumes_after_a_killed_worker(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    preset = digits_preset(epochs=2)
    kw = dict(
        preset=preset,
        optimizers=["sgd", "sam"],
        seeds=1,
        sigmas=[0.5],
        flatness_draws=1,
        flatness_samples=100,
    )
    ref = compare(tmp_path / "serial", executor=SerialExecutor(), **kw)
    # a worker killed mid-run: one run stopped after its first epoch (checkpoint, no summary)
    out = tmp_path / "sub"
    sgd_cfg = TrainConfig.from_dict({**ref.configs["grad-evals"]["sgd"], "seed": 0})
    Trainer(sgd_cfg, out / "runs/grad-evals/sgd/seed0", progress=False).run(max_eval_points=1)
    assert (out / "runs/grad-evals/sgd/seed0/checkpoint.pt").is_file()
    assert not (out / "runs/grad-evals/sgd/seed0/summary.json").exists()
    ex = make_executor(
        "submitit", folder=tmp_path / "logs", cluster="local", runs_per_job=2, timeout_min=5
    )
    sub = compare(out, executor=ex, **kw)
    assert {(r["arm"], r["test_error"]) for r in sub.runs} == {
        (r["arm"], r["test_error"]) for r in ref.runs
    }
    assert sub.settings["executor"]["name"] == "submitit"
    forbid_training(monkeypatch)  # everything finished: nothing is submitted again
    again = compare(out, executor=ex, write=False, **kw)
    assert [r["test_error"] for r in again.runs] == [r["test_error"] for r in sub.runs]


def test_every_preset_plans_a_valid_protocol_and_the_quick_start_stays_fixed():
    from flatminima.studies._runs import MeasureSettings
    from flatminima.studies.compare import plan_compare
    from flatminima.studies.presets import list_presets, load_preset

    for name in list_presets():
        if name.startswith("study-"):
            continue
        preset = load_preset(name)
        plan = plan_compare(
            "unused",
            preset,
            optimizers=None,
            seeds=None,
            budget=None,
            overrides={},
            settings=MeasureSettings(),
            large_batch=None,
            margin=None,
            tune=None,
        )  # tuning spec, equal effort and seed disjointness are checked here
        assert plan.margin == 0.003, name
        if plan.tuning is not None:
            assert len(plan.seeds) >= 10, name
    quick = load_preset("fashion-quick")
    plan = plan_compare(
        "unused",
        quick,
        optimizers=None,
        seeds=None,
        budget=None,
        overrides={},
        settings=MeasureSettings(),
        large_batch=None,
        margin=None,
        tune=None,
    )
    assert plan.tuning is None and "tune" in quick.study["provenance"]
    assert set(plan.configs["epochs"]) == {"sgd", "esgd", "rsgd", "sam"}  # no extra runs


def test_cli_no_tune_skips_the_tuning_spec_and_takes_an_executor(tmp_path, capsys):
    import yaml

    from flatminima.cli import main

    study = {"tuning": {"seeds": 3, "space": {"sgd": {"lr": [0.05, 0.1]}}}, "margin": 0.01}
    preset_file = tmp_path / "p.yaml"
    preset_file.write_text(yaml.safe_dump(digits_preset(study).to_dict()))
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--preset-file",
        str(preset_file),
        "--optimizers",
        "sgd",
        "--seeds",
        "1",
        "--sigmas",
        "0.5",
        "--flatness-draws",
        "1",
        "--flatness-samples",
        "100",
        "--out",
        str(out),
        "--no-progress",
        "--executor",
        "serial",
        "--no-tune",
    ]
    assert main(args) == 0
    assert not (out / "tuning").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["tuned"] is False and saved["settings"]["margin"] == 0.01
    assert saved["settings"]["executor"] == {"name": "serial"}
    assert "not tuned by this run" in (out / "report.md").read_text()
    with pytest.raises(SystemExit):
        main([*args[:-3], "--executor", "ray"])
    assert "invalid choice" in capsys.readouterr().err


def test_compare_refuses_a_weak_or_missing_tuning_split_before_training(tmp_path):
    weak = {"tuning": {"seeds": [7, 8], "val_size": 300, "space": SPACE}}
    with pytest.raises(ValueError, match="mostly noise"):
        compare(tmp_path, preset=digits_preset(weak), optimizers=["sgd", "sam"], seeds=2)
    none = {"tuning": {"seeds": 3, "val_size": 0, "space": SPACE}}
    with pytest.raises(ValueError, match="validation split"):
        compare(tmp_path, preset=digits_preset(none), optimizers=["sgd", "sam"], seeds=2)
    bad = {"tuning": {"seeds": 3, "space": {**SPACE, "sam": {"rho": [0.01, -1.0]}}}}
    with pytest.raises(ValueError, match="rho"):
        compare(tmp_path, preset=digits_preset(bad), optimizers=["sgd", "sam"], seeds=2)
    assert not any(tmp_path.iterdir())
