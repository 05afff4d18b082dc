"""The README's results blocks are regenerated from committed CSVs (scripts/results.py)."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import results as R  # noqa: E402


def test_committed_blocks_match_the_csvs(capsys):
    """`python scripts/results.py --check`: every generated block equals its recomputation."""
    assert R.main(["--check"]) == 0, capsys.readouterr().out


def test_every_block_in_the_readme_is_generated():
    text = (ROOT / "README.md").read_text()
    names = R.MARK.findall(text)
    assert names, "README has no generated results block"
    known = R.blocks(ROOT)
    assert {n for n, _ in names} <= set(known)
    # every re-measured study has its block in the Results section
    results = text[text.index("## Results\n") : text.index("## Benchmarks\n")]
    for name in (
        "digits",
        "gmm-balanced",
        "gmm-rho0.3",
        "gmm-delta0.5",
        "compare-fashion-cnn-cpu",
        "compare-small-train",
        "compare-label-noise40",
        "compare-large-batch",
    ):
        assert f"<!-- results:{name} -->" in results, name


def _tmp_repo(tmp_path: Path, readme: str) -> Path:
    (tmp_path / "docs/results").mkdir(parents=True)
    shutil.copytree(ROOT / "docs/results/study-digits", tmp_path / "docs/results/study-digits")
    (tmp_path / "README.md").write_text(readme)
    return tmp_path


def test_a_changed_number_fails_the_check_and_a_rewrite_restores_it(tmp_path, capsys):
    body = R.block_digits(ROOT)
    good = f"intro\n<!-- results:digits -->\n{body}\n<!-- /results:digits -->\ntail\n"
    bad = good.replace("+0.57 [", "+0.58 [", 1)
    assert bad != good
    root = _tmp_repo(tmp_path, bad)
    assert R.run(root, check=True) == 1
    assert "+0.58 [" in capsys.readouterr().out  # the diff names the stale number
    assert R.run(root, check=False) == 0
    assert (root / "README.md").read_text() == good
    assert R.run(root, check=True) == 0


def test_unknown_block_is_an_error(tmp_path):
    root = _tmp_repo(tmp_path, "<!-- results:nope -->\nx\n<!-- /results:nope -->\n")
    with pytest.raises(SystemExit, match="unknown results block 'nope'"):
        R.run(root, check=True)


def test_digits_block_matches_the_study_own_correlations():
    """The README recomputation equals the study's correlations.csv (same tau, BCa, Holm)."""
    rows, info = R.digits_correlations(ROOT)
    committed = R.read_csv(ROOT / "docs/results/study-digits/correlations.csv")
    ref = {(r["measure"], r["target"]): r for r in committed if r.get("kendall_p_holm")}
    assert len(rows) == len(ref) == 24
    for r in rows:
        col = f"{r['measure']}_s{r['sigma']:g}" if r["sigma"] is not None else r["measure"]
        c = ref[(col, r["target"])]
        for key in ("kendall_tau", "tau_ci_low", "tau_ci_high", "kendall_p_holm"):
            assert r[key] == pytest.approx(float(c[key]), abs=1e-9), (col, key)
    assert [b["optimizer"] for b in info["bad"]] == ["esgd"]


def _write_runs(
    path: Path, arms: dict[str, list[float]], early: dict[str, list[float]] | None = None
) -> None:
    path.mkdir(parents=True)
    with open(path / "runs.csv", "w", newline="") as fh:
        cols = ["budget", "arm", "seed", "status", "test_error", "early_stopped_test_error"]
        w = csv.DictWriter(fh, [*cols, "flag"])
        w.writeheader()
        for arm, vals in arms.items():
            for s, v in enumerate(vals):
                w.writerow(
                    dict(
                        budget="grad-evals",
                        arm=arm,
                        seed=s,
                        status="complete",
                        test_error=v,
                        early_stopped_test_error=early[arm][s] if early else "",
                        flag="ok",
                    )
                )
    with open(path / "paired.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["budget", "subset", "optimizer", "reference"])
        w.writeheader()
        for subset in ("all", "early-stopped") if early else ("all",):
            for arm in arms:
                if arm != "sgd":
                    w.writerow(
                        dict(budget="grad-evals", subset=subset, optimizer=arm, reference="sgd")
                    )


def test_compare_block_pairs_by_seed_and_labels_verdicts(tmp_path):
    """Hand-built per-seed errors: rSGD = SGD + 1 pp (+-0.05 pp, mean exactly +1 pp) on all 10
    seeds -> loss, sign-flip p = 2/1024 raw; SAM = SGD +- 0.02 pp -> equivalent (0.3 pp)."""
    sgd = [0.10 + 0.003 * s for s in range(10)]
    wiggle = [0.0005 * (-1) ** s for s in range(10)]
    arms = {
        "sgd": sgd,
        "rsgd": [x + 0.01 + w for x, w in zip(sgd, wiggle)],
        "sam": [x + 0.4 * w for x, w in zip(sgd, wiggle)],
    }
    _write_runs(tmp_path / "docs/results/toy", arms)
    text = R.block_compare(tmp_path, "toy", margin=0.003)
    rsgd = next(line for line in text.splitlines() if line.startswith("| rsgd | sgd"))
    sam = next(line for line in text.splitlines() if line.startswith("| sam | sgd"))
    assert "| 10 | +1.00 [" in rsgd and rsgd.endswith("| loss |")
    assert "0.002 /" in rsgd  # 2 / 1024 = 0.00195 raw sign-flip p
    assert "| 10 | +0.00 [" in sam and sam.endswith("| equivalent |")
    assert "| rsgd | 10 | 12.35 +- " in text  # mean over seeds of 0.1 + 0.003 s + 0.01


def test_compare_block_renders_the_early_stopped_family_from_its_own_column(tmp_path):
    """Final networks: rSGD = SGD + 1 pp (loss); early-stopped networks: rSGD = SGD - 1 pp on
    every seed (win). Both families are rendered, each from its own per-seed column."""
    sgd = [0.10 + 0.003 * s for s in range(10)]
    wiggle = [0.0005 * (-1) ** s for s in range(10)]
    arms = {"sgd": sgd, "rsgd": [x + 0.01 + w for x, w in zip(sgd, wiggle)]}
    early = {"sgd": sgd, "rsgd": [x - 0.01 + w for x, w in zip(sgd, wiggle)]}
    _write_runs(tmp_path / "docs/results/toy", arms, early)
    text = R.block_compare(tmp_path, "toy", margin=0.003)
    final, stopped = [ln for ln in text.splitlines() if ln.startswith("| rsgd | sgd")]
    assert "| +1.00 [" in final and final.endswith("| loss |")
    assert "| -1.00 [" in stopped and stopped.endswith("| win |")
    assert "lowest validation error" in text and "| rsgd | 10 | 10.35 +- " in text
    _write_runs(tmp_path / "docs/results/plain", arms)  # no early-stopped family: one table
    assert "lowest validation error" not in R.block_compare(tmp_path, "plain", margin=0.003)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_compare_flatness_rows_recompute_from_the_per_seed_local_energy(tmp_path):
    """SAM's dE(0.1) is SGD's minus 1 pp on all 10 seeds: mean -1.00 pp, raw sign-flip p
    2/1024; the block shows the study's Holm p, and a study row that does not recompute from
    the per-seed file is refused."""
    d = tmp_path / "docs/results/toy"
    sgd = [0.10 + 0.003 * s for s in range(10)]
    _write_runs(d, {"sgd": sgd, "sam": sgd})
    de = {"sgd": [0.05 + 0.001 * s for s in range(10)]}
    de["sam"] = [x - 0.01 for x in de["sgd"]]
    _write_csv(
        d / "flatness.csv",
        [
            dict(budget="grad-evals", arm=a, seed=s, sigma=0.1, local_energy_error=v)
            for a, vals in de.items()
            for s, v in enumerate(vals)
        ],
    )
    row = dict(budget="grad-evals", optimizer="sam", reference="sgd", against="final",
               sigma=0.1, mean=-0.01, p_perm=2 / 1024, p_perm_holm=0.0039)  # fmt: skip
    _write_csv(d / "flatness_tests.csv", [row])
    text = R.block_compare(tmp_path, "toy", margin=0.003)
    assert "| sam | sgd | final | -1.00 (0.0039) |" in text
    _write_csv(d / "flatness_tests.csv", [{**row, "mean": -0.02}])
    with pytest.raises(SystemExit, match="does not recompute"):
        R.block_compare(tmp_path, "toy", margin=0.003)


def test_gmm_values_leave_out_collapsed_and_missing_fits():
    rows = [
        dict(estimator="sgd_loss", stop="val", alpha="1.0", seed="0", eps_g="0.2", collapsed="0"),
        dict(estimator="sgd_loss", stop="val", alpha="1.0", seed="1", eps_g="0.5", collapsed="1"),
    ]
    vals = R._gmm_values(rows, "sgd_loss", "val", 1.0, "eps_g", [0, 1, 2])
    assert vals[0] == 0.2 and all(v != v for v in vals[1:])


def test_formatting():
    assert (R.pct(0.1234), R.pp(-0.0041), R.pval(0.0004), R.pval(0.031)) == (
        "12.34",
        "-0.41",
        "<0.001",
        "0.031",
    )
    assert R.seed_list([0, 1, 2, 3]) == "0-3" and R.seed_list([0, 2]) == "0, 2"


def test_import_compare_copies_the_csvs_and_keeps_the_study_margin(tmp_path):
    run_dir = tmp_path / "runs/toy"
    sgd = [0.10 + 0.003 * s for s in range(4)]
    _write_runs(run_dir.parent / "toy", {"sgd": sgd, "sam": [x + 0.001 for x in sgd]})
    (run_dir / "results.csv").write_text("budget\ngrad-evals\n")
    (run_dir / "flatness_tests.csv").write_text(
        "budget,optimizer,reference,against,sigma,mean,p_perm,p_perm_holm\n"
    )
    run = dict(budget="grad-evals", arm="sam", seed=3, local_energy_sigmas=[0.1, 0.5],
               local_energy_error=[0.02, 0.2])  # fmt: skip
    (run_dir / "results.json").write_text(
        json.dumps(
            {
                "settings": {"margin": 0.005, "preset": "/x/src/flatminima/presets/toy.yaml"},
                "runs": [run],
            }
        )
    )
    root = tmp_path / "repo"
    dest = R.import_compare(root, run_dir, "toy")
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [*R.COMPARE_FILES, "settings.json", R.FLATNESS_FILE]
    )
    per_seed = R.read_csv(dest / R.FLATNESS_FILE)
    assert [(r["seed"], r["sigma"], r["local_energy_error"]) for r in per_seed] == [
        ("3", "0.1", "0.02"),
        ("3", "0.5", "0.2"),
    ]
    assert "TOST margin 0.5 pp" in R.block_compare(root, "toy")
    saved = json.loads((dest / "settings.json").read_text())
    assert "runs" not in saved  # per-run histories stay out
    assert saved["settings"]["preset"] == "src/flatminima/presets/toy.yaml"  # not this machine's
    with pytest.raises(SystemExit, match="missing results.json"):
        (run_dir / "results.json").unlink()
        R.import_compare(root, run_dir, "toy")


def test_compare_figure_draws_every_comparison(tmp_path):
    import results_figures as F

    sgd = [0.10 + 0.003 * s for s in range(6)]
    _write_runs(tmp_path / "docs/results/toy", {"sgd": sgd, "sam": [x - 0.002 for x in sgd]})
    path = F.compare_figure(tmp_path, tmp_path / "fig", "toy")
    assert path.name == "compare_toy.png" and path.stat().st_size > 5000
