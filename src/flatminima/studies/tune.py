"""Grid search of one optimizer's hyperparameters on a validation split (never the test set).

Every grid point (a *trial*) is trained for each seed on the training split minus a validation
split (``val_size > 0`` is required) and scored by its **final validation error**, averaged over
seeds; ties go to the lower validation loss, then to the earlier trial. Test metrics are never
read: the trial records hold only validation and training numbers, so nothing downstream can
select on the test set.

Equal-effort rule: a fair comparison gives every optimizer the same number of trials at the same
budget. ``trials=N`` runs exactly ``N`` grid points (a seeded random subset when the grid is
larger, an error when it is smaller), so tuning SGD, eSGD, rSGD and SAM with the same ``N``,
``epochs`` and seeds spends the same effort on each; the number of trials is recorded in the
output so it can be checked.

Outputs in ``out_dir``: ``best.yaml`` (a preset fragment ``{arm: {key: value}}`` to paste under a
preset, or pass via ``--preset-file``), ``trials.csv`` and ``tune.md`` (all trials, best first),
``tune.json``; each trial's runs in ``trials/NNN/seedS``.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flatminima.studies._runs import DataCache, train_run
from flatminima.studies.compare import _seed_list, summarize
from flatminima.studies.presets import Preset, arm_config, arm_optimizer, parse_grid

log = logging.getLogger(__name__)

__all__ = ["TuneResult", "grid_points", "rank_trials", "select_best", "tune"]

#: the only metrics a trial record carries (validation and training, never test)
TRIAL_METRICS = ("val_error", "val_loss", "train_error")


def grid_points(
    grid: Mapping[str, Sequence[Any]], max_points: int | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """Cartesian product of ``grid`` (in key order), or a seeded random subset of ``max_points``.

    Raises:
        ValueError: an empty grid, or ``max_points`` < 1 or larger than the grid.
    """
    if not grid:
        raise ValueError("Empty grid: give at least one KEY=V1,V2,... item")
    keys = list(grid)
    points = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]
    if max_points is None:
        return points
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1:
        raise ValueError(f"Invalid number of trials {max_points!r}: must be an integer >= 1")
    if max_points > len(points):
        raise ValueError(
            f"Invalid number of trials {max_points}: the grid has only {len(points)} points; "
            "equal effort needs the same number of trials for every optimizer, so enlarge the "
            "grid or lower the number"
        )
    chosen = sorted(random.Random(seed).sample(range(len(points)), max_points))
    return [points[i] for i in chosen]


def select_best(trials: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The trial with the lowest ``val_error`` (ties: lower ``val_loss``, then earlier trial).

    Only ``val_error``, ``val_loss`` and ``trial`` are read: a record's test metrics, if any,
    are never looked at.

    Raises:
        ValueError: no trials, or no trial with a finite validation error.
    """
    scored = [
        t
        for t in trials
        if isinstance(t["val_error"], (int, float)) and math.isfinite(t["val_error"])
    ]
    if not scored:
        raise ValueError("No trial has a finite validation error; is val_size > 0?")

    def key(t: Mapping[str, Any]) -> tuple[float, float, int]:
        vl = t["val_loss"]
        vl = vl if isinstance(vl, (int, float)) and math.isfinite(vl) else math.inf
        return (float(t["val_error"]), float(vl), int(t["trial"]))

    return min(scored, key=key)


def rank_trials(trials: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Trials best first by (val_error, val_loss, trial); NaN (diverged) last."""

    def num(x: Any) -> float:
        return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else math.inf

    return sorted(trials, key=lambda t: (num(t["val_error"]), num(t["val_loss"]), t["trial"]))


@dataclass
class TuneResult:
    """Outcome of :func:`tune`: all trials (validation metrics only) and the best one."""

    optimizer: str
    trials: list[dict[str, Any]]
    best: dict[str, Any]
    fragment: dict[str, dict[str, Any]]
    out_dir: Path


def tune(
    out_dir: str | Path,
    *,
    optimizer: str,
    grid: str | Mapping[str, Sequence[Any]],
    preset: Preset | None = None,
    overrides: dict[str, Any] | None = None,
    seeds: int | Sequence[int] = 1,
    trials: int | None = None,
    trial_seed: int = 0,
    progress: bool = False,
) -> TuneResult:
    """Grid-search ``optimizer`` on a validation split and write the best settings.

    Args:
        out_dir: output folder (trial runs in ``out_dir/trials``).
        optimizer: an optimizer name or a preset arm label.
        grid: ``"lr=0.02,0.05;gamma=1e-3,1e-2"`` or a mapping key -> values.
        preset: base settings (``common`` + the arm's mapping); the grid overrides them.
        overrides: TrainConfig keys applied before the grid (e.g. ``val_size``, ``epochs``).
        seeds: seeds per trial (count or list); the score is the mean over seeds.
        trials: run exactly this many grid points (equal-effort rule; see the module docstring).
        trial_seed: seed of the random subset of grid points.
        progress: tqdm bar over trials.

    Returns:
        A :class:`TuneResult`.

    Raises:
        ValueError: an unknown optimizer, a bad or empty grid, a grid key ``optimizer`` or
            ``seed``, ``val_size`` of 0 (tuning needs a validation split), or bad ``trials``.
    """
    arm_optimizer(preset, optimizer)
    parsed = parse_grid(grid) if isinstance(grid, str) else parse_grid(dict(grid))
    for bad in ("optimizer", "seed", "val_size"):
        if bad in parsed:
            raise ValueError(
                f"Invalid grid key {bad!r}: tune one optimizer at fixed seeds and validation "
                "split; run tune once per optimizer instead"
            )
    points = grid_points(parsed, trials, trial_seed)
    seed_list = _seed_list(seeds)
    over = dict(overrides or {})
    over.setdefault("progress", False)
    configs = [arm_config(preset, optimizer, {**over, **p}) for p in points]  # validate first
    if configs[0].val_size <= 0:
        raise ValueError(
            f"Invalid val_size {configs[0].val_size!r}: tuning needs a validation split "
            "(e.g. --val-size 0.1); the test set is never used for selection"
        )
    out = Path(out_dir)
    data = DataCache()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(points) * len(seed_list), unit="run", desc=f"tune {optimizer}")
    records: list[dict[str, Any]] = []
    try:
        for i, (point, cfg) in enumerate(zip(points, configs)):
            per_seed: dict[str, list[float]] = {k: [] for k in TRIAL_METRICS}
            for s in seed_list:
                summary = train_run(
                    cfg.replace(seed=s), out / "trials" / f"{i:03d}" / f"seed{s}", data
                )
                # a diverged run's last row predates the divergence: it must not score
                final = summary.get("final", {}) if summary.get("status") == "complete" else {}
                for k in TRIAL_METRICS:  # only validation/training numbers leave this loop
                    per_seed[k].append(final.get(k, math.nan))
                if bar is not None:
                    bar.update(1)
            ve = summarize(per_seed["val_error"])
            if ve["n"] < len(seed_list):  # a trial that diverged on any seed is disqualified
                ve["mean"] = math.nan
            records.append(
                {
                    "trial": i,
                    **point,
                    "val_error": ve["mean"],
                    "val_error_se": ve["se"],
                    "val_loss": summarize(per_seed["val_loss"])["mean"],
                    "train_error": summarize(per_seed["train_error"])["mean"],
                    "seeds": len(seed_list),
                }
            )
    finally:
        if bar is not None:
            bar.close()
    best = dict(select_best(records))
    fragment = {optimizer: {k: best[k] for k in parsed}}
    result = TuneResult(optimizer, records, best, fragment, out)
    _write(result, parsed, seed_list, configs[0].to_dict(), len(points))
    return result


def _write(
    result: TuneResult,
    grid: dict[str, list[Any]],
    seeds: list[int],
    base: dict[str, Any],
    n_trials: int,
) -> None:
    from flatminima._table import format_table
    from flatminima.studies.report import write_csv, write_json

    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    ranked = rank_trials(result.trials)
    write_csv(ranked, out / "trials.csv")
    header = (
        f"# best of {n_trials} trials for {result.optimizer} by validation error "
        f"{result.best['val_error']:.4f} (seeds {seeds}, budget {base['budget']} "
        f"{base['epochs']} epochs)\n"
    )
    (out / "best.yaml").write_text(header + yaml.safe_dump(result.fragment, sort_keys=False))
    write_json(
        {
            "optimizer": result.optimizer,
            "grid": grid,
            "n_trials": n_trials,
            "seeds": seeds,
            "best": result.best,
            "fragment": result.fragment,
            "trials": ranked,
            "base_config": {k: v for k, v in base.items() if k not in grid},
        },
        out / "tune.json",
    )
    cols = ["trial", *grid, "val_error", "val_error_se", "val_loss", "train_error"]
    text = [
        f"# Tuning {result.optimizer}",
        "",
        f"{n_trials} trials, {len(seeds)} seed(s) each, scored by final validation error "
        f"(validation split {base['val_size']}; the test set is never used).",
        "",
        "Best: `"
        + yaml.safe_dump(result.fragment[result.optimizer], default_flow_style=True).strip()
        + "`",
        "",
        format_table(ranked, cols, markdown=True),
        "",
    ]
    (out / "tune.md").write_text("\n".join(text))
    log.info(
        "tune: best %s (val error %.4f) written to %s",
        result.fragment,
        result.best["val_error"],
        out / "best.yaml",
    )
