"""Compare optimizers over paired seeds at a stated budget, with flatness, and write a report.

Design (Pittorino et al., ICLR 2021, Sec. 5 and Tables 1-3, re-done with error bars):

* every (budget, arm, seed) is one run folder ``OUT/runs/BUDGET/ARM/seedS`` trained by
  :func:`flatminima.train.train`: a finished run is skipped, a partial one resumes;
* **paired seeds**: seed ``s`` gives every arm the same data split, training subset, label noise
  and data-order seed (``TrainConfig.seed = s``), so per-seed differences cancel the data noise;
* **budget**: ``"grad-evals"`` (default, equal gradient evaluations: equal compute) or
  ``"epochs"`` (equal epochs per replica, the paper's parallel wall-clock setting), always
  labelled; ``"both"`` runs both;
* the local energy ``delta_E(sigma)`` of each final evaluated network (the rSGD centre) is
  measured on a fixed training subset and cached in the run folder (``flatness.json``);
* with a validation split (``val_size > 0``), early-stopped SGD (the epoch of lowest validation
  error) is reported as its own control row.

Statistics over seeds: mean, sample standard deviation ``std`` (ddof 1) and standard error
``se = std / sqrt(n)``. The paired difference of arm ``a`` against reference ``r`` is
``d_s = err_a(s) - err_r(s)``; its mean, ``se = std(d) / sqrt(n)``, a Student-t 95% interval and
the two-sided paired t-test p-value are reported.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flatminima.studies._runs import (
    DataCache,
    MeasureSettings,
    measure_run,
    read_metrics,
    train_run,
)
from flatminima.studies.presets import Preset, arm_config, arm_optimizer
from flatminima.train import TrainConfig, read_summary

log = logging.getLogger(__name__)

__all__ = [
    "BUDGET_LABELS",
    "CompareResult",
    "compare",
    "compare_configs",
    "paired_difference",
    "parse_budget",
    "summarize",
]

#: budget name (TrainConfig.budget) -> label used in every table and plot
BUDGET_LABELS = {"grad-evals": "equal gradient evaluations", "epochs": "equal epochs per replica"}
_BUDGET_ALIASES = {
    "grad-evals": ["grad-evals"],
    "equal-grad-evals": ["grad-evals"],
    "epochs": ["epochs"],
    "equal-epochs": ["epochs"],
    "both": ["grad-evals", "epochs"],
}
EARLY_STOPPED = "sgd (early-stopped)"
LARGE_BATCH = "sgd-large-batch"
REFERENCES = ("sgd", "sam")


def parse_budget(budget: str) -> list[str]:
    """``grad-evals``/``equal-grad-evals``, ``epochs``/``equal-epochs`` or ``both`` -> budgets.

    Raises:
        ValueError: any other value (the message lists the valid ones).
    """
    if budget not in _BUDGET_ALIASES:
        raise ValueError(f"Invalid budget {budget!r}; valid: {', '.join(_BUDGET_ALIASES)}")
    return list(_BUDGET_ALIASES[budget])


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std (ddof 1; NaN for one value) and standard error ``std / sqrt(n)``."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "se": math.nan}
    std = float(v.std(ddof=1)) if n > 1 else math.nan
    return {"n": n, "mean": float(v.mean()), "std": std, "se": std / math.sqrt(n)}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired difference ``d_s = a_s - b_s`` over seeds: mean, std, se, 95% t interval, p-value.

    ``se = std(d, ddof=1) / sqrt(n)``; the interval is ``mean +- t_{0.975, n-1} se``; ``p`` is the
    two-sided paired t-test (NaN for fewer than two pairs or zero spread).

    Raises:
        ValueError: ``a`` and ``b`` have different lengths.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    s = summarize(d.tolist())
    n, mean, se = s["n"], s["mean"], s["se"]
    if n > 1 and se > 0:
        half = float(stats.t.ppf(0.975, n - 1)) * se
        p = float(2 * stats.t.sf(abs(mean / se), n - 1))
    else:
        half, p = math.nan, math.nan
    return {**s, "ci_low": mean - half, "ci_high": mean + half, "p_value": p}


@dataclass
class CompareResult:
    """Everything a comparison produced (also written to ``results.json``).

    Attributes:
        table: one row per (budget, arm), plus the early-stopped SGD control rows.
        paired: paired differences against SGD and SAM, one row per (budget, arm, reference).
        runs: one record per run (final metrics and local energy).
        curves: learning curves, ``{budget: {arm: {"grad_evals", "mean", "se"}}}``.
        energy: local-energy curves, ``{budget: {arm: {"sigmas", "mean", "se"}}}``.
        configs: resolved configuration of each arm, ``{budget: {arm: config dict}}``.
        settings: the comparison's settings (seeds, budgets, sigmas, preset).
        out_dir: the report folder.
    """

    table: list[dict[str, Any]]
    paired: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    curves: dict[str, dict[str, dict[str, list[float]]]]
    energy: dict[str, dict[str, dict[str, list[float]]]]
    configs: dict[str, dict[str, dict[str, Any]]]
    settings: dict[str, Any]
    out_dir: Path
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "paired": self.paired,
            "runs": self.runs,
            "curves": self.curves,
            "local_energy": self.energy,
            "configs": self.configs,
            "settings": self.settings,
            "files": self.files,
        }


def compare_configs(
    preset: Preset | None,
    arms: Sequence[str],
    budget: str,
    overrides: dict[str, Any] | None = None,
    large_batch: bool = False,
) -> dict[str, TrainConfig]:
    """The TrainConfig of every arm under ``budget`` (seed 0; the seed is set per run).

    ``large_batch`` adds the arm ``sgd-large-batch``: SGD with batch ``y * B`` where ``y`` and
    ``B`` are the rSGD arm's replicas and batch size, every other setting from the ``sgd`` arm
    (the paper's control for rSGD's larger effective batch).

    Raises:
        ValueError: an unknown arm or key, an invalid value, or ``large_batch`` without an
            ``rsgd`` arm.
    """
    if not arms:
        raise ValueError("No optimizers given; choose from sgd, esgd, rsgd, sam")
    if len(set(arms)) != len(arms):
        raise ValueError(f"Duplicate optimizers in {list(arms)}")
    over = dict(overrides or {})
    over["budget"] = budget
    configs = {arm: arm_config(preset, arm, over) for arm in arms}
    if large_batch:
        if "rsgd" not in configs:
            raise ValueError("large_batch needs an 'rsgd' arm to match (y replicas of batch B)")
        r = configs["rsgd"]
        configs[LARGE_BATCH] = arm_config(
            preset, "sgd", over, batch_size=r.num_replicas * r.batch_size
        )
    return configs


def _seed_list(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, bool):
        raise ValueError(f"Invalid seeds {seeds!r}: a count >= 1 or a list of seeds")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"Invalid seeds {seeds!r}: the number of seeds must be >= 1")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise ValueError(f"Invalid seeds {list(seeds)!r}: distinct integers >= 0, at least one")
    return out


def _clean(x: float) -> float:
    """Round float round-off to 0 (|x| < 1e-12: a mean of values that cancel exactly)."""
    return 0.0 if abs(x) < 1e-12 else x


def _curve(runs: list[dict[str, Any]], key: str = "test_error") -> dict[str, list[float]]:
    """Mean and SE over seeds per epoch index (runs of one arm share their epoch grid)."""
    histories = [r["history"] for r in runs if r["history"] and r["status"] == "complete"]
    if not histories:
        return {"grad_evals": [], "mean": [], "se": []}
    length = min(len(h) for h in histories)
    ge, mean, se = [], [], []
    for i in range(length):
        s = summarize([h[i].get(key, math.nan) for h in histories])
        ge.append(float(np.mean([h[i]["grad_evals"] for h in histories])))
        mean.append(s["mean"])
        se.append(0.0 if math.isnan(s["se"]) else s["se"])
    return {"grad_evals": ge, "mean": mean, "se": se}


def _same_under_both_budgets(configs: dict[str, dict[str, TrainConfig]], arm: str) -> bool:
    """Whether ``arm`` trains the identical run under both budgets (SGD, eSGD: one backward
    pass per minibatch, so equal epochs of data are equal gradient evaluations)."""
    a, b = configs["grad-evals"].get(arm), configs["epochs"].get(arm)
    if a is None or b is None or a.optimizer not in ("sgd", "esgd"):
        return False
    return a.replace(budget="epochs") == b


def _train_worker(item: tuple[str, dict[str, Any]], threads: int) -> str:
    import torch

    torch.set_num_threads(threads)
    run_dir, values = item
    cfg = TrainConfig.from_dict(values)
    train_run(cfg, Path(run_dir), DataCache())
    return run_dir


def train_parallel(
    items: list[tuple[str, TrainConfig]], jobs: int, *, progress: bool = False
) -> None:
    """Train (or resume/skip) run folders in ``jobs`` worker processes (spawned: safe with
    threads); each worker uses ``cores // jobs`` torch threads."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    todo = [(d, c) for d, c in items if not _finished(c, Path(d))]
    if not todo:
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="run", desc=f"training ({jobs} jobs)")
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_train_worker, (d, c.to_dict()), threads) for d, c in todo]
        try:
            for fut in as_completed(futures):
                fut.result()
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()


def _finished(cfg: TrainConfig, run_dir: Path) -> bool:
    summary = read_summary(run_dir)
    return bool(
        summary
        and summary.get("config") == cfg.numerics()
        and summary.get("status") in ("complete", "diverged")
    )


def compare(
    out_dir: str | Path,
    *,
    preset: Preset | None = None,
    optimizers: Sequence[str] | None = None,
    seeds: int | Sequence[int] | None = None,
    budget: str | None = None,
    epochs: float | None = None,
    overrides: dict[str, Any] | None = None,
    sigmas: Sequence[float] | None = None,
    flatness_draws: int | None = None,
    flatness_samples: int | None = None,
    large_batch: bool | None = None,
    progress: bool = False,
    write: bool = True,
    jobs: int = 1,
) -> CompareResult:
    """Train every (budget, arm, seed), measure local energy, and write the report folder.

    Arguments left ``None`` come from the preset's ``study:`` mapping, else the defaults
    (optimizers sgd/esgd/rsgd/sam, 3 seeds, ``grad-evals`` budget, sigmas 0.05..0.5, 5 draws,
    2000 samples).

    Args:
        out_dir: report folder; runs go to ``out_dir/runs/BUDGET/ARM/seedS``.
        preset: hyperparameters (``common`` + per-arm mappings); ``None``: TrainConfig defaults.
        optimizers: arms to compare (optimizer names or preset arm labels).
        seeds: number of seeds (``0..n-1``) or explicit seeds.
        budget: ``grad-evals`` (equal gradient evaluations), ``epochs`` (equal epochs per
            replica) or ``both``.
        epochs: the budget in epochs (overrides the preset for every arm).
        overrides: TrainConfig keys applied to every arm (after the preset).
        sigmas: local-energy noise strengths.
        flatness_draws: noise draws per sigma.
        flatness_samples: size of the fixed training subset the local energy is measured on.
        large_batch: add the ``sgd-large-batch`` control (see :func:`compare_configs`).
        progress: show a tqdm bar over runs.
        write: write report.md, results.json, CSVs and PNGs into ``out_dir``.
        jobs: training processes run at once (each with ``torch`` threads = cores // jobs);
            measurements and the report are made afterwards in this process.

    Returns:
        A :class:`CompareResult`.

    Raises:
        ValueError: an unknown optimizer, budget, key or value (before any training starts).
    """
    study = dict(preset.study) if preset is not None else {}
    arms = list(optimizers or study.get("optimizers") or ["sgd", "esgd", "rsgd", "sam"])
    seed_list = _seed_list(seeds if seeds is not None else study.get("seeds", 3))
    budgets = parse_budget(budget or study.get("budget", "grad-evals"))
    settings = MeasureSettings(
        sigmas=[float(s) for s in (sigmas or study.get("sigmas") or [0.05, 0.1, 0.2, 0.3, 0.5])],
        n_draws=int(flatness_draws or study.get("flatness_draws", 5)),
        n_samples=int(flatness_samples or study.get("flatness_samples", 2000)),
    )
    settings.validate()
    lb = bool(study.get("large_batch", False) if large_batch is None else large_batch)
    over = dict(overrides or {})
    if epochs is not None:
        over["epochs"] = epochs
    over.setdefault("progress", False)
    for arm in arms:
        arm_optimizer(preset, arm)  # unknown names fail here, naming the value
    configs = {b: compare_configs(preset, arms, b, over, lb) for b in budgets}
    out = Path(out_dir)
    jobs_all = [(b, arm, s) for b in budgets for arm in configs[b] for s in seed_list]
    log.info(
        "compare: %d runs (%d budgets x %d arms x %d seeds) into %s",
        len(jobs_all),
        len(budgets),
        len(configs[budgets[0]]),
        len(seed_list),
        out,
    )

    def run_of(b: str, arm: str, s: int) -> tuple[TrainConfig, Path]:
        # SGD-like arms (one pass per minibatch) give the same run under both budgets: train once
        if b == "epochs" and "grad-evals" in configs and _same_under_both_budgets(configs, arm):
            b = "grad-evals"
        return configs[b][arm].replace(seed=s), out / "runs" / b / arm / f"seed{s}"

    if jobs < 1:
        raise ValueError(f"Invalid jobs value: {jobs} (must be >= 1)")
    if jobs > 1:
        pending = {}
        for b, arm, s in jobs_all:
            cfg, run_dir = run_of(b, arm, s)
            pending[str(run_dir)] = cfg
        train_parallel(list(pending.items()), jobs, progress=progress)

    data = DataCache()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs_all), unit="run", desc="compare")
    runs: list[dict[str, Any]] = []
    try:
        for b, arm, s in jobs_all:
            cfg, run_dir = run_of(b, arm, s)
            if bar is not None:
                bar.set_postfix_str(f"{arm} seed {s} ({b})")
            summary = train_run(cfg, run_dir, data)
            ok = summary.get("status") == "complete"
            nan = [math.nan] * len(settings.sigmas)
            flat = (
                measure_run(cfg, run_dir, data, settings)["local_energy"]
                if ok
                else {"sigmas": settings.sigmas, "delta_error": nan, "delta_loss": nan}
            )
            final = summary.get("final", {}) if ok else {}
            es = summary.get("early_stopped") or {}
            runs.append(
                {
                    "budget": b,
                    "arm": arm,
                    "optimizer": cfg.optimizer,
                    "seed": s,
                    "run_dir": str(run_dir),
                    "status": summary.get("status"),
                    "test_error": final.get("test_error"),
                    "test_loss": final.get("test_loss"),
                    "train_error": final.get("train_error"),
                    "val_error": final.get("val_error"),
                    "early_stopped_test_error": es.get("test_error"),
                    "early_stopped_epoch": es.get("epoch"),
                    "grad_evals": summary.get("grad_evals"),
                    "train_time_s": summary.get("train_time_s"),
                    "local_energy_sigmas": flat["sigmas"],
                    "local_energy_error": flat["delta_error"],
                    "local_energy_loss": flat["delta_loss"],
                    "history": read_metrics(run_dir),
                }
            )
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    result = _aggregate(runs, configs, budgets, seed_list, settings, preset, out)
    if write:
        from flatminima.studies.report import write_compare_report

        write_compare_report(result)
    return result


def _aggregate(
    runs: list[dict[str, Any]],
    configs: dict[str, dict[str, TrainConfig]],
    budgets: list[str],
    seed_list: list[int],
    settings: MeasureSettings,
    preset: Preset | None,
    out: Path,
) -> CompareResult:
    table, paired = [], []
    curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    energy: dict[str, dict[str, dict[str, list[float]]]] = {}
    sig = settings.sigmas
    for b in budgets:
        curves[b], energy[b] = {}, {}
        by_arm = {
            arm: sorted(
                (r for r in runs if r["budget"] == b and r["arm"] == arm), key=lambda r: r["seed"]
            )
            for arm in configs[b]
        }
        for arm, rs in by_arm.items():
            te = summarize([r["test_error"] for r in rs])
            row: dict[str, Any] = {
                "budget": b,
                "optimizer": arm,
                "seeds": te["n"],
                "diverged": sum(r["status"] != "complete" for r in rs),
                "test_error": te["mean"],
                "test_error_std": te["std"],
                "test_error_se": te["se"],
                "train_error": summarize([r["train_error"] for r in rs])["mean"],
            }
            mean_e, se_e = [], []
            for i, s in enumerate(sig):
                es = summarize([r["local_energy_error"][i] for r in rs])
                es["mean"] = _clean(es["mean"])
                row[f"dE({s:g})"] = es["mean"]
                row[f"dE({s:g})_se"] = es["se"]
                mean_e.append(es["mean"])
                se_e.append(0.0 if math.isnan(es["se"]) else es["se"])
            ge = [r["grad_evals"] for r in rs if r["status"] == "complete"]
            row["grad_evals"] = int(np.mean(ge)) if ge else None
            row["train_time_s"] = summarize([r["train_time_s"] for r in rs])["mean"]
            table.append(row)
            curves[b][arm] = _curve(rs)
            energy[b][arm] = {"sigmas": list(sig), "mean": mean_e, "se": se_e}
            if arm == "sgd" and any(r["early_stopped_test_error"] is not None for r in rs):
                es_ = summarize([r["early_stopped_test_error"] for r in rs])
                table.append(
                    {
                        "budget": b,
                        "optimizer": EARLY_STOPPED,
                        "seeds": es_["n"],
                        "test_error": es_["mean"],
                        "test_error_std": es_["std"],
                        "test_error_se": es_["se"],
                    }
                )
        for ref in REFERENCES:
            if ref not in by_arm:
                continue
            ref_err = {r["seed"]: r["test_error"] for r in by_arm[ref]}
            for arm, rs in by_arm.items():
                if arm == ref or (
                    arm in REFERENCES and REFERENCES.index(arm) < REFERENCES.index(ref)
                ):
                    continue  # sgd against sam is already there as sam against sgd
                pairs = [(r["test_error"], ref_err[r["seed"]]) for r in rs if r["seed"] in ref_err]
                if not pairs:
                    continue
                d = paired_difference([p[0] for p in pairs], [p[1] for p in pairs])
                paired.append(
                    {
                        "budget": b,
                        "optimizer": arm,
                        "reference": ref,
                        "pairs": d["n"],
                        "diff_test_error": d["mean"],
                        "diff_se": d["se"],
                        "ci_low": d["ci_low"],
                        "ci_high": d["ci_high"],
                        "p_value": d["p_value"],
                    }
                )
    settings_out = {
        "seeds": seed_list,
        "budgets": budgets,
        "budget_labels": {b: BUDGET_LABELS[b] for b in budgets},
        "sigmas": list(sig),
        "flatness_draws": settings.n_draws,
        "flatness_samples": settings.n_samples,
        "measure_seed": settings.seed,
        "preset": preset.source if preset is not None else None,
        "preset_description": preset.description if preset is not None else "",
    }
    cfg_out = {b: {a: c.to_dict() for a, c in cs.items()} for b, cs in configs.items()}
    return CompareResult(table, paired, runs, curves, energy, cfg_out, settings_out, out)
