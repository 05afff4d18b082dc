"""Compare optimizers over paired seeds at a stated budget, with flatness, and write a report.

Design (Pittorino et al., ICLR 2021, Sec. 5 and Tables 1-3, re-done as a fair protocol). One call
of :func:`compare` runs five stages, each a function:

1. :func:`plan_compare`: every input checked (arms, seeds, budgets, margin, the preset's tuning
   spec: equal planned trials per arm, tuning seeds disjoint from the evaluation seeds); nothing
   is trained before this passes;
2. :func:`tune_stage`: every arm tuned at every budget it is evaluated at on its own tuning seeds
   and a validation split (:func:`flatminima.studies.tune.tune_arm`), the chosen values applied;
3. the runs, handed to an executor (:mod:`flatminima.studies.executors`: this process, a local
   process pool, submitit/SLURM); a finished run is skipped, a partial one resumes;
4. :func:`collect`: summaries read back, collapsed runs flagged
   (:func:`flatminima.studies.stats.is_collapsed`), local energy measured and cached;
5. :func:`aggregate`: tables and paired tests (:mod:`flatminima.studies.stats`), then the report.

* **paired seeds**: seed ``s`` gives every arm the same data split, training subset, label noise
  and data-order seed, so per-seed differences cancel the data noise;
* **budget**: ``"grad-evals"`` (equal gradient evaluations) or ``"epochs"`` (equal epochs per
  replica, the paper's setting), always labelled; ``"both"`` runs both. At equal epochs every
  multi-pass arm gets SGD with the same gradient evaluations (``sgd-compute-ARM``) and rSGD the
  large-batch control;
* **early stopping**: with a validation split every run also records its network at the
  evaluation point of lowest validation error. Each arm and control gets an ``ARM
  (early-stopped)`` row, and the same paired comparisons are repeated on the early-stopped
  networks as their own family of tests (subset ``early-stopped``, Holm within it), so a
  control that loses only because it overfits a long budget is seen as such;
* **flatness**: local energy ``delta_E(sigma)`` of each final evaluated network (the rSGD
  centre), paired against SGD's final network and against SGD at matched training error (SGD's
  local energy is measured at every evaluation point during its run).

Statistics over seeds: mean, sample standard deviation ``std`` (ddof 1) and standard error
``se = std / sqrt(n)``; paired tests as in :mod:`flatminima.studies.stats`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flatminima.optim.registry import REGISTRY, optimizer_spec
from flatminima.studies._runs import (
    DataCache,
    MeasureSettings,
    measure_run,
    read_metrics,
    train_run,
)
from flatminima.studies.executors import make_executor
from flatminima.studies.presets import Preset, arm_config, arm_optimizer, seed_list
from flatminima.studies.report import BUDGET_LABELS, write_compare_report
from flatminima.studies.stats import (
    COLLAPSE_FRACTION,
    DEFAULT_MARGIN,
    add_table_tests,
    is_collapsed,
    paired_test,
    tost_p,
)
from flatminima.studies.tune import (
    SearchSpace,
    check_search_keys,
    check_selection,
    planned_trials,
    tune_arm,
)
from flatminima.train import TrainConfig

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

_BUDGET_ALIASES = {
    "grad-evals": ["grad-evals"],
    "equal-grad-evals": ["grad-evals"],
    "epochs": ["epochs"],
    "equal-epochs": ["epochs"],
    "both": ["grad-evals", "epochs"],
}
#: paired-test family in which every arm and control is its early-stopped network
EARLY_STOPPED_SUBSET = "early-stopped"
LARGE_BATCH = "sgd-large-batch"
#: how the controls at equal epochs get their hyperparameters (``study.tuning.controls``):
#: ``inherit`` the SGD arm's tuned values, or be ``tuned`` at their own budget with the SGD
#: arm's search (same planned trials, seeds and validation split as every arm)
CONTROL_TUNING = ("inherit", "tuned")
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
        paired: paired test-error tests (against SGD, SAM and each arm's controls), one row per
            (budget, subset, arm, reference), Holm-adjusted per (budget, subset), with verdicts.
        flatness_tests: paired local-energy tests against SGD (final networks, and SGD at
            matched training error), per sigma.
        tuning: ``{budget: {arm: tuning.json contents}}`` (empty when not tuned).
        runs: one record per run (final metrics and local energy).
        curves: learning curves, ``{budget: {arm: {"samples", "mean", "se"}}}`` (``samples``:
            samples through backward at each evaluation point).
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
    flatness_tests: list[dict[str, Any]] = field(default_factory=list)
    tuning: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "paired": self.paired,
            "flatness_tests": self.flatness_tests,
            "tuning": self.tuning,
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
        raise ValueError(f"No optimizers given; choose from {', '.join(REGISTRY)}")
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


def _clean(x: float) -> float:
    """Round float round-off to 0 (|x| < 1e-12: a mean of values that cancel exactly)."""
    return 0.0 if abs(x) < 1e-12 else x


def _curve(runs: list[dict[str, Any]], key: str = "test_error") -> dict[str, list[float]]:
    """Mean and SE over seeds per evaluation point (runs of one arm share their grid)."""
    histories = [r["history"] for r in runs if r["history"] and r["status"] == "complete"]
    if not histories:
        return {"samples": [], "mean": [], "se": []}
    length = min(len(h) for h in histories)
    ge, mean, se = [], [], []
    for i in range(length):
        s = summarize([h[i].get(key, math.nan) for h in histories])
        ge.append(float(np.mean([h[i]["samples"] for h in histories])))
        mean.append(s["mean"])
        se.append(0.0 if math.isnan(s["se"]) else s["se"])
    return {"samples": ge, "mean": mean, "se": se}


def _passes_per_sample(cfg: TrainConfig) -> int | float:
    """Backward passes per data sample at equal epochs (registry): rSGD ``y``, SAM 2, SGD 1."""
    return optimizer_spec(cfg.optimizer).passes_per_sample(cfg)


def control_label(arm: str) -> str:
    """Label of the compute-matched SGD control of ``arm``."""
    return f"sgd-compute-{arm}"


@dataclass
class ComparePlan:
    """Everything decided before any training (stage 1 of :func:`compare`).

    Attributes:
        configs: ``{budget: {label: TrainConfig}}`` of the evaluated arms and controls (seed 0).
        controls: ``{budget: {control label: arm it controls}}``.
        tuning: the preset's tuning spec (``None``: hyperparameters as given).
    """

    out: Path
    arms: list[str]
    seeds: list[int]
    budgets: list[str]
    settings: MeasureSettings
    margin: float
    preset: Preset | None
    overrides: dict[str, Any]
    large_batch: bool
    tuning: dict[str, Any] | None
    with_controls: bool = True
    configs: dict[str, dict[str, TrainConfig]] = field(default_factory=dict)
    controls: dict[str, dict[str, str]] = field(default_factory=dict)
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)

    def run_of(self, b: str, label: str, s: int) -> tuple[TrainConfig, Path]:
        """Config and folder of one run (arms whose registry entry has
        ``same_run_both_budgets``, SGD and eSGD, share their run across budgets)."""
        cfg = self.configs[b][label]
        if b == "epochs" and "grad-evals" in self.configs and label in self.configs["grad-evals"]:
            other = self.configs["grad-evals"][label]
            same = optimizer_spec(other.optimizer).same_run_both_budgets
            if same and other.replace(budget="epochs") == cfg:
                b, cfg = "grad-evals", other
        return cfg.replace(seed=s), self.out / "runs" / b / label / f"seed{s}"

    def items(self) -> list[tuple[Path, TrainConfig]]:
        """Every evaluation run, once (stage 3's input)."""
        out: dict[Path, TrainConfig] = {}
        for b in self.budgets:
            for label in self.configs[b]:
                for s in self.seeds:
                    cfg, run_dir = self.run_of(b, label, s)
                    out.setdefault(run_dir, cfg)
        return list(out.items())


def _tuning_spec(study: dict[str, Any], tune: bool | None) -> dict[str, Any] | None:
    spec = study.get("tuning")
    if tune is False or spec in (None, "none", False):
        if tune:
            raise ValueError("tune=True but the preset has no study.tuning spec")
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("space"), dict):
        raise ValueError(
            f"Invalid study.tuning {spec!r}: 'none' or a mapping with 'space' "
            "(per arm: {key: [values], then: {key: [values]}}), 'seeds', 'val_size', 'max_extend'"
        )
    bad = sorted(set(spec) - {"space", "seeds", "val_size", "max_extend", "allow_weak", "controls"})
    if bad:
        raise ValueError(
            f"Unknown study.tuning key(s) {bad}; valid: space, seeds, val_size, max_extend, "
            "allow_weak, controls"
        )
    if spec.get("controls", "inherit") not in CONTROL_TUNING:
        raise ValueError(
            f"Invalid study.tuning.controls {spec.get('controls')!r}; valid: "
            + ", ".join(CONTROL_TUNING)
        )
    return spec


def plan_compare(
    out_dir: str | Path,
    preset: Preset | None,
    *,
    optimizers: Sequence[str] | None,
    seeds: int | Sequence[int] | None,
    budget: str | None,
    overrides: dict[str, Any],
    settings: MeasureSettings,
    large_batch: bool | None,
    margin: float | None,
    tune: bool | None,
) -> ComparePlan:
    """Stage 1: validate every input and fix the arms, seeds, budgets and tuning (no training).

    Raises:
        ValueError: an unknown optimizer, budget, key or value; tuning seeds that overlap the
            evaluation seeds; unequal planned trials between arms.
    """

    study = dict(preset.study) if preset is not None else {}
    arms = list(optimizers or study.get("optimizers") or REGISTRY)
    seeds_ = seed_list(seeds if seeds is not None else study.get("seeds", 3))
    budgets = parse_budget(budget or study.get("budget", "grad-evals"))
    settings.validate()
    m = float(margin if margin is not None else study.get("margin", DEFAULT_MARGIN))
    tost_p([0.0, 0.0], m)  # a bad margin fails here, naming it
    lb = bool(study.get("large_batch", False) if large_batch is None else large_batch)
    over = {"progress": False, **overrides}
    for arm in arms:
        arm_optimizer(preset, arm)  # unknown names fail here, naming the value
    plan = ComparePlan(
        Path(out_dir),
        arms,
        seeds_,
        budgets,
        settings,
        m,
        preset,
        over,
        lb,
        _tuning_spec(study, tune),
        bool(study.get("controls", True)),
    )
    plan.configs = {b: compare_configs(preset, arms, b, over, lb) for b in budgets}
    if plan.tuning is not None:
        _check_tuning(plan)
    _finish_configs(plan)
    return plan


def _tuning_seeds(plan: ComparePlan) -> list[int]:
    spec = plan.tuning or {}
    seeds = spec.get("seeds", 3)
    if isinstance(seeds, int) and not isinstance(seeds, bool):  # n seeds after the evaluation ones
        seeds = list(range(max(plan.seeds) + 1, max(plan.seeds) + 1 + seeds))
    seeds = seed_list(seeds)
    overlap = sorted(set(seeds) & set(plan.seeds))
    if overlap:
        raise ValueError(
            f"Tuning seeds {seeds} overlap the evaluation seeds {plan.seeds} at {overlap}: "
            "a seed used to choose hyperparameters must never be evaluated"
        )
    return seeds


def _check_tuning(plan: ComparePlan) -> None:
    """Parse every arm's search space and check equal effort (before any training)."""
    spec = plan.tuning or {}
    _tuning_seeds(plan)
    missing = [a for a in plan.arms if a not in spec["space"]]
    if missing:
        raise ValueError(f"study.tuning.space has no search for arm(s) {missing}")
    counts = {}
    for arm in plan.arms:
        space = SearchSpace.parse(spec["space"][arm], int(spec.get("max_extend", 2)))
        base = _tuning_base(plan, arm, plan.budgets[0])
        check_search_keys(space, base.optimizer)
        counts[arm] = planned_trials(space, base)
        for key, vals in {**space.grid, **space.then}.items():
            for v in vals:
                base.replace(**{key: v})  # a bad value fails here, naming it
    if base.val_size >= 1:  # a count: checked now (a fraction is checked when tuning starts)
        check_selection(len(_tuning_seeds(plan)), int(base.val_size), bool(spec.get("allow_weak")))
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"Unequal tuning effort: planned trials per arm {counts}; give every arm the same "
            "number (grid points plus follow-up values)"
        )


def _tuning_base(plan: ComparePlan, arm: str, budget: str) -> TrainConfig:
    """The config an arm is tuned from at ``budget`` (the tuning spec's validation split).

    Raises:
        ValueError: no validation split (tuning never reads the test set).
    """
    return _with_tuning_split(
        plan, arm_config(plan.preset, arm, {**plan.overrides, "budget": budget})
    )


def _with_tuning_split(plan: ComparePlan, cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the tuning spec's validation split (``study.tuning.val_size``, else its own).

    Raises:
        ValueError: no validation split (tuning never reads the test set).
    """
    val = (plan.tuning or {}).get("val_size")
    base = cfg.replace(val_size=val) if val is not None else cfg
    if base.val_size <= 0:
        raise ValueError(
            f"Invalid tuning val_size {base.val_size!r}: tuning needs a validation split "
            "(study.tuning.val_size, e.g. 5000); the test set is never used for selection"
        )
    return base


def _finish_configs(plan: ComparePlan) -> None:
    """Add the controls at equal epochs, and SGD's in-run local energy (matched training error).

    At the ``epochs`` budget (unless the preset says ``controls: false``) every multi-pass
    arm (rSGD: y passes, SAM: 2) gets SGD with the same gradient evaluations
    (``sgd-compute-ARM``: the SGD arm's settings, ``epochs x passes`` epochs), and rSGD the
    large-batch control (batch ``y x B``).
    """
    for b in plan.budgets:
        cfgs = plan.configs[b]
        plan.controls[b] = {}
        if "sgd" in cfgs:
            sgd = cfgs["sgd"]
            points = sgd.eval_points or max(1, round(sgd.epochs))
            cfgs["sgd"] = sgd.replace(
                flatness_epochs=list(range(1, points + 1)),
                flatness_sigmas=list(plan.settings.sigmas),
                flatness_draws=plan.settings.n_draws,
                flatness_samples=plan.settings.n_samples,
            )
        if b != "epochs" or "sgd" not in cfgs or not plan.with_controls:
            continue
        for arm in plan.arms:
            k = _passes_per_sample(cfgs[arm])
            if k > 1:
                label = control_label(arm)
                cfgs[label] = cfgs["sgd"].replace(
                    budget="grad-evals", epochs=cfgs[arm].epochs * k, flatness_epochs=[]
                )
                plan.controls[b][label] = arm
        if "rsgd" in plan.arms:
            r = cfgs["rsgd"]
            cfgs[LARGE_BATCH] = cfgs["sgd"].replace(
                batch_size=r.num_replicas * r.batch_size, flatness_epochs=[]
            )
            plan.controls[b][LARGE_BATCH] = "rsgd"
        for label in plan.controls[b]:  # controls tuned at their own budget keep their values
            own = plan.tuned.get(b, {}).get(label)
            if own is not None:
                cfgs[label] = cfgs[label].replace(**own["chosen"])


def tune_stage(plan: ComparePlan, executor: Any) -> dict[str, dict[str, Any]]:
    """Stage 2: tune every arm at every budget on its tuning seeds; apply the chosen values.

    SGD and eSGD train the same run under both budgets, so their ``epochs`` tuning is the
    ``grad-evals`` one. Controls take the tuned SGD values, or, with
    ``study.tuning.controls: tuned``, are tuned at their own budget with SGD's search
    (:func:`_tune_controls`). Returns ``{budget: {arm or control: tuning.json contents}}``.
    """

    spec = plan.tuning or {}
    seeds = _tuning_seeds(plan)
    report: dict[str, dict[str, Any]] = {}
    for b in plan.budgets:
        report[b] = {}
        for arm in plan.arms:
            base = _tuning_base(plan, arm, b)
            same = optimizer_spec(base.optimizer).same_run_both_budgets
            if b == "epochs" and same and "grad-evals" in report:
                report[b][arm] = report["grad-evals"][arm]
                continue
            report[b][arm] = _tune_one(plan, b, arm, base, spec["space"][arm], seeds, executor)
        if spec.get("controls", "inherit") == "tuned":
            report[b].update(_tune_controls(plan, b, seeds, executor))
    for b in plan.budgets:
        chosen = {arm: report[b][arm]["chosen"] for arm in plan.arms}
        plan.configs[b] = compare_configs(
            plan.preset, plan.arms, b, plan.overrides, plan.large_batch
        )
        for arm in plan.arms:
            plan.configs[b][arm] = plan.configs[b][arm].replace(**chosen[arm])
        if LARGE_BATCH in plan.configs[b] and LARGE_BATCH not in chosen and "sgd" in chosen:
            # the generated control (``large_batch``) takes SGD's values; a preset arm of that
            # name was tuned like any other arm and keeps its own
            plan.configs[b][LARGE_BATCH] = plan.configs[b][LARGE_BATCH].replace(**chosen["sgd"])
    plan.tuned = report
    _finish_configs(plan)
    return report


def _tune_controls(
    plan: ComparePlan, b: str, seeds: list[int], executor: Any
) -> dict[str, dict[str, Any]]:
    """Tune every control of budget ``b`` at its own budget (``study.tuning.controls: tuned``).

    A control is SGD, so it gets the SGD arm's search space (the same planned trials as every
    arm), the tuning seeds and the validation split; its base is the control as planned before
    tuning (SGD's untuned settings at the control's epochs or batch size).
    """
    sgd_space = (plan.tuning or {})["space"]["sgd"]
    return {
        label: _tune_one(
            plan,
            b,
            label,
            _with_tuning_split(plan, plan.configs[b][label]),
            sgd_space,
            seeds,
            executor,
        )
        for label in plan.controls.get(b, {})
    }


def _tune_one(
    plan: ComparePlan,
    b: str,
    label: str,
    base: TrainConfig,
    space: Any,
    seeds: list[int],
    executor: Any,
) -> dict[str, Any]:
    """Tune one arm or control from ``base`` over the search ``space`` (the preset's mapping)
    into ``OUT/tuning/BUDGET/LABEL``; returns its tuning.json contents."""
    spec = plan.tuning or {}
    res = tune_arm(
        plan.out / "tuning" / b / label,
        base,
        SearchSpace.parse(space, int(spec.get("max_extend", 2))),
        seeds,
        arm=label,
        executor=executor,
        allow_weak=bool(spec.get("allow_weak", False)),
    )
    return res.to_dict()


def _run_record(plan: ComparePlan, b: str, label: str, s: int, data: DataCache) -> dict[str, Any]:
    """Stage 4 for one run: read its summary, flag collapse, measure its local energy."""

    cfg, run_dir = plan.run_of(b, label, s)
    summary = train_run(cfg, run_dir, data)  # finished by the executor: only read back here
    ok = summary.get("status") == "complete"
    final = summary.get("final", {}) if ok else {}
    loss = final.get("train_eval_loss", final.get("train_loss"))
    collapsed = ok and is_collapsed(final.get("train_error"), loss, data.get(cfg).num_classes)
    nan = [math.nan] * len(plan.settings.sigmas)
    flat = (
        measure_run(cfg, run_dir, data, plan.settings)["local_energy"]
        if ok
        else {"sigmas": plan.settings.sigmas, "delta_error": nan, "delta_loss": nan}
    )
    es = summary.get("early_stopped") or {}
    return {
        "budget": b,
        "arm": label,
        "optimizer": cfg.optimizer,
        "seed": s,
        "run_dir": str(run_dir),
        "status": summary.get("status"),
        "flag": "collapsed" if collapsed else ("ok" if ok else summary.get("status")),
        "collapsed": collapsed,
        "test_error": final.get("test_error"),
        "test_loss": final.get("test_loss"),
        "train_error": final.get("train_error"),
        "train_loss": loss,
        "val_error": final.get("val_error"),
        "early_stopped_test_error": es.get("test_error"),
        "early_stopped_eval_point": es.get("eval_point"),
        "samples": summary.get("samples"),
        "train_time_s": summary.get("train_time_s"),
        "local_energy_sigmas": flat["sigmas"],
        "local_energy_error": flat["delta_error"],
        "local_energy_loss": flat["delta_loss"],
        "history": read_metrics(run_dir),
    }


def collect(plan: ComparePlan, *, progress: bool = False) -> list[dict[str, Any]]:
    """Stage 4: one record per (budget, arm, seed), read back and measured in this process."""
    data = DataCache()
    keys = [(b, label, s) for b in plan.budgets for label in plan.configs[b] for s in plan.seeds]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(keys), unit="run", desc="measuring")
    runs = []
    try:
        for b, label, s in keys:
            runs.append(_run_record(plan, b, label, s, data))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return runs


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
    executor: Any = None,
    tune: bool | None = None,
    margin: float | None = None,
) -> CompareResult:
    """Plan, tune, train, collect, aggregate and write one comparison (resumable).

    Stages: :func:`plan_compare` (every input checked, nothing trained), :func:`tune_stage`
    (when the preset has a ``study.tuning`` spec and ``tune`` is not ``False``), the runs through
    ``executor``, :func:`collect` (summaries, collapse flags, local energy in this process),
    :func:`aggregate` (tables and paired tests) and the report. Arguments left ``None`` come from
    the preset's ``study:`` mapping, else the defaults (every registry optimizer, 3 seeds,
    ``grad-evals``, sigmas 0.05..0.5, 5 draws, 2000 samples, margin 0.003).

    Args:
        out_dir: report folder; runs in ``out_dir/runs/BUDGET/ARM/seedS``, tuning in
            ``out_dir/tuning/BUDGET/ARM``.
        preset: hyperparameters (``common`` + per-arm mappings) and study settings.
        optimizers: arms to compare; seeds: evaluation seeds (count or list); budget:
            ``grad-evals``, ``epochs`` or ``both``; epochs: the budget in epochs.
        overrides: TrainConfig keys applied to every arm (after the preset).
        sigmas, flatness_draws, flatness_samples: local-energy settings.
        large_batch: add ``sgd-large-batch`` at every budget (at equal epochs it is added
            whenever rSGD is compared).
        progress: tqdm bars; write: write the report folder.
        jobs: worker processes of the default local executor.
        executor: a :mod:`flatminima.studies.executors` executor (overrides ``jobs``).
        tune: ``False`` skips the preset's tuning (hyperparameters as given); ``True`` requires
            a spec; ``None`` tunes when the preset has one.
        margin: equivalence margin of the TOST, in error units (preset ``study.margin``).

    Raises:
        ValueError: a bad input (before any training starts).
    """

    study = dict(preset.study) if preset is not None else {}
    settings = MeasureSettings(
        sigmas=[float(s) for s in (sigmas or study.get("sigmas") or [0.05, 0.1, 0.2, 0.3, 0.5])],
        n_draws=int(flatness_draws or study.get("flatness_draws", 5)),
        n_samples=int(flatness_samples or study.get("flatness_samples", 2000)),
    )
    over = dict(overrides or {})
    if epochs is not None:
        over["epochs"] = epochs
    if executor is None:
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"Invalid jobs value: {jobs!r} (must be an integer >= 1)")
    plan = plan_compare(
        out_dir,
        preset,
        optimizers=optimizers,
        seeds=seeds,
        budget=budget,
        overrides=over,
        settings=settings,
        large_batch=large_batch,
        margin=margin,
        tune=tune,
    )
    executor = executor or make_executor("local", jobs=jobs)
    if plan.tuning is not None:
        tune_stage(plan, executor)
    items = plan.items()
    log.info("compare: %d runs into %s (%s executor)", len(items), plan.out, executor.name)
    executor.run(items, progress=progress)
    runs = collect(plan, progress=progress)
    result = aggregate(plan, runs, executor.describe())
    if write:
        write_compare_report(result)
    return result


def _arm_row(b: str, arm: str, rs: list[dict[str, Any]], sig: list[float]) -> dict[str, Any]:
    """One table row: test error over complete runs (collapsed included) and without them."""
    te = summarize([r["test_error"] for r in rs])
    kept = summarize([r["test_error"] for r in rs if not r["collapsed"]])
    n_col = sum(r["collapsed"] for r in rs)
    row: dict[str, Any] = {
        "budget": b,
        "optimizer": arm,
        "seeds": te["n"],
        "diverged": sum(r["status"] != "complete" for r in rs),
        "collapsed": f"{n_col}/{len(rs)}",
        "test_error": te["mean"],
        "test_error_std": te["std"],
        "test_error_se": te["se"],
        "test_error_without_collapsed": kept["mean"],
        "train_error": summarize([r["train_error"] for r in rs])["mean"],
    }
    for i, s in enumerate(sig):
        es = summarize([r["local_energy_error"][i] for r in rs])
        row[f"dE({s:g})"] = _clean(es["mean"])
        row[f"dE({s:g})_se"] = es["se"]
    ge = [r["samples"] for r in rs if r["status"] == "complete"]
    row["samples"] = int(np.mean(ge)) if ge else None
    row["train_time_s"] = summarize([r["train_time_s"] for r in rs])["mean"]
    return row


def _comparisons(plan: ComparePlan, b: str) -> list[tuple[str, str]]:
    """(arm, reference) pairs of one budget's table: against SGD, against SAM, own controls."""
    arms, pairs = plan.arms, []
    for ref in REFERENCES:
        if ref in arms:
            pairs += [
                (a, ref)
                for a in arms
                if a != ref
                and not (a in REFERENCES and REFERENCES.index(a) < REFERENCES.index(ref))
            ]
    pairs += [(arm, ctrl) for ctrl, arm in plan.controls.get(b, {}).items()]
    if LARGE_BATCH in arms and "rsgd" in arms and ("rsgd", LARGE_BATCH) not in pairs:
        pairs.append(("rsgd", LARGE_BATCH))  # a preset arm: rSGD against the batch it replaces
    return pairs


def _paired_rows(
    plan: ComparePlan, b: str, by_arm: dict[str, list[dict[str, Any]]], subset: str
) -> list[dict[str, Any]]:
    """Paired test-error tests of one table, Holm-adjusted together, with verdicts."""

    rows = []
    for arm, ref in _comparisons(plan, b):
        ref_by_seed = {r["seed"]: r for r in by_arm[ref]}
        pairs = [(r, ref_by_seed[r["seed"]]) for r in by_arm[arm] if r["seed"] in ref_by_seed]
        if subset == "without collapsed":
            pairs = [(x, y) for x, y in pairs if not (x["collapsed"] or y["collapsed"])]
        a = [np.nan if x["test_error"] is None else x["test_error"] for x, _ in pairs]
        r = [np.nan if y["test_error"] is None else y["test_error"] for _, y in pairs]
        t = paired_test(a, r, margin=plan.margin)
        rows.append(
            {
                "budget": b,
                "subset": subset,
                "optimizer": arm,
                "reference": ref,
                "pairs": t.pop("n"),
                **{k: _clean(v) if k == "mean" else v for k, v in t.items()},
            }
        )
    return add_table_tests(rows)


def _flat_rows(
    plan: ComparePlan, b: str, by_arm: dict[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Paired local-energy tests against SGD: final networks, and at matched training error."""

    if "sgd" not in by_arm:
        return []
    rows = []
    sgd = {r["seed"]: r for r in by_arm["sgd"]}
    for arm in plan.arms:
        if arm == "sgd":
            continue
        pairs = [(r, sgd[r["seed"]]) for r in by_arm[arm] if r["seed"] in sgd]
        for i, s in enumerate(plan.settings.sigmas):
            a = [x["local_energy_error"][i] for x, _ in pairs]
            final = [y["local_energy_error"][i] for _, y in pairs]
            matched = [_matched_energy(y, x["train_error"], s) for x, y in pairs]
            against = (("final", final), ("matched train error", [m[0] for m in matched]))
            for kind, ref_vals in against:
                t = paired_test(a, ref_vals)
                row = {
                    "budget": b,
                    "optimizer": arm,
                    "reference": "sgd",
                    "against": kind,
                    "sigma": s,
                    "pairs": t.pop("n"),
                    **t,
                    "mean": _clean(t["mean"]),
                }
                if kind != "final":
                    gaps = [m[1] for m in matched if math.isfinite(m[1])]
                    row["train_error_gap"] = float(np.mean(gaps)) if gaps else math.nan
                rows.append(row)
    return add_table_tests(rows)


def _matched_energy(sgd_run: dict[str, Any], train_error: float | None, sigma: float) -> tuple:
    """SGD's local energy at its evaluation point whose training error is closest to
    ``train_error`` (ties: the later point), and the gap ``|e_sgd - e|`` there."""
    key = f"local_energy_error_s{sigma:g}"
    rows = [
        h
        for h in sgd_run["history"]
        if math.isfinite(h.get(key, math.nan)) and math.isfinite(h.get("train_error", math.nan))
    ]
    if train_error is None or not rows or not math.isfinite(train_error):
        return (math.nan, math.nan)
    best = min(reversed(rows), key=lambda h: abs(h["train_error"] - train_error))
    return (best[key], abs(best["train_error"] - train_error))


def aggregate(
    plan: ComparePlan, runs: list[dict[str, Any]], executor: dict[str, Any] | None = None
) -> CompareResult:
    """Stage 5: tables, paired tests (test error, local energy) and curves of every budget."""
    table, paired, flat = [], [], []
    curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    energy: dict[str, dict[str, dict[str, list[float]]]] = {}
    sig = plan.settings.sigmas
    for b in plan.budgets:
        by_arm = {
            label: sorted(
                (r for r in runs if r["budget"] == b and r["arm"] == label), key=lambda r: r["seed"]
            )
            for label in plan.configs[b]
        }
        curves[b], energy[b] = {}, {}
        for arm, rs in by_arm.items():
            row = _arm_row(b, arm, rs, sig)
            table.append(row)
            curves[b][arm] = _curve(rs)
            energy[b][arm] = {
                "sigmas": list(sig),
                "mean": [row[f"dE({s:g})"] for s in sig],
                "se": [_nan0(row[f"dE({s:g})_se"]) for s in sig],
            }
        stopped = _early_stopped(by_arm)
        for arm, rs in stopped.items():
            es = summarize([r["test_error"] for r in rs])
            table.append(
                {
                    "budget": b,
                    "optimizer": early_stopped_label(arm),
                    "seeds": es["n"],
                    "test_error": es["mean"],
                    "test_error_std": es["std"],
                    "test_error_se": es["se"],
                }
            )
        paired += _paired_rows(plan, b, by_arm, "all")
        if any(r["collapsed"] for rs in by_arm.values() for r in rs):
            paired += _paired_rows(plan, b, by_arm, "without collapsed")
        if set(stopped) == set(by_arm):
            paired += _paired_rows(plan, b, stopped, EARLY_STOPPED_SUBSET)
        flat += _flat_rows(plan, b, by_arm)
    return CompareResult(
        table,
        paired,
        runs,
        curves,
        energy,
        {b: {a: c.to_dict() for a, c in cs.items()} for b, cs in plan.configs.items()},
        _settings(plan, executor),
        plan.out,
        flatness_tests=flat,
        tuning=plan.tuned,
    )


def early_stopped_label(arm: str) -> str:
    """Table label of ``arm``'s early-stopped networks (``sgd (early-stopped)``)."""
    return f"{arm} (early-stopped)"


def _early_stopped(by_arm: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Every arm whose runs chose an early-stopping point on the validation split, its runs
    with ``test_error`` replaced by the test error at that point (the same seeds, flags kept).

    An arm is left out when any of its complete runs has no early-stopped record (no
    validation split): the early-stopped family of tests is formed only when every arm has one.
    """
    out = {}
    for arm, rs in by_arm.items():
        done = [r for r in rs if r["status"] == "complete"]
        if done and all(r["early_stopped_test_error"] is not None for r in done):
            out[arm] = [{**r, "test_error": r["early_stopped_test_error"]} for r in rs]
    return out


def _nan0(x: float) -> float:
    return 0.0 if x is None or math.isnan(x) else x


def _settings(plan: ComparePlan, executor: dict[str, Any] | None) -> dict[str, Any]:

    p = plan.preset
    study = dict(p.study) if p is not None else {}
    return {
        "seeds": plan.seeds,
        "budgets": plan.budgets,
        "budget_labels": {b: BUDGET_LABELS[b] for b in plan.budgets},
        "sigmas": list(plan.settings.sigmas),
        "flatness_draws": plan.settings.n_draws,
        "flatness_samples": plan.settings.n_samples,
        "measure_seed": plan.settings.seed,
        "margin": plan.margin,
        "collapse_fraction": COLLAPSE_FRACTION,
        "controls": plan.controls,
        "tuned": plan.tuning is not None,
        "control_tuning": plan.tuning.get("controls", "inherit") if plan.tuning else None,
        "tuning_seeds": _tuning_seeds(plan) if plan.tuning is not None else [],
        "provenance": study.get("provenance"),
        "executor": executor or {},
        "preset": p.source if p is not None else None,
        "preset_description": p.description if p is not None else "",
    }
