"""Equal-effort tuning of one arm on a validation split, on its own seeds (never the test set).

Search (:func:`tune_arm`), in stages; every stage's runs go through an executor at once:

1. **grid**: every point of the cartesian product of the arm's primary axes (the registry's
   ``knobs``: SGD ``lr``; eSGD outer ``lr`` x ``gamma``; rSGD ``lr`` x ``gamma``; SAM ``lr`` x
   ``rho``); a setting only other optimizers read is refused (:func:`check_search_keys`);
2. **edge extension**: when the chosen point lies on the edge of a numeric axis with at least two
   values, one more value beyond that edge is tried (the point's other values fixed), with the
   grid's step (geometric ``v * v / neighbour`` for positive values, else arithmetic); at most
   ``max_extend`` steps per axis, the same cap for every arm. A chosen point still on an edge
   after the cap is flagged ``on_edge``;
3. **follow-up axes** (``then``; the registry's ``follow_up_knobs``, eSGD: the inner lr): each
   value tried at the chosen point, then
   extended like stage 2. A value equal to the chosen point's own is not run again.

The number of **planned trials** (grid points plus follow-up values) is what equal effort
compares between arms (:func:`planned_trials`); extension trials are counted and reported
apart (``n_extension``) under the common cap.

Score of a trial: the mean over the tuning seeds of the **final validation error**; its standard
error ``se`` is ``std(ddof 1) / sqrt(n_seeds)`` with two or more seeds, else the binomial
``sqrt(e (1 - e) / n_val)``. A trial that diverges or **collapses** (ends at chance, see
:func:`flatminima.studies.compare.is_collapsed`) on any tuning seed has failed and is never
chosen. **Selection rule**: the best trial has the lowest score; every trial whose score is
within one SE of the best (``score <= best + se_best``) is *tied*; the chosen trial is the tied
trial with the lowest mean validation loss (a smoother score than the 0/1 error), then the
earlier trial. Trial runs never evaluate the test set (``evaluate_test=False``): no test
number exists that could leak into a decision, and a trial costs less.

Selection must mean something: at least 3 tuning seeds or at least 5000 validation images
(:data:`MIN_SEEDS`, :data:`MIN_VAL`); otherwise a ``ValueError`` unless ``allow_weak=True``
(then a warning is logged and written into the output).

Outputs in ``out_dir``: ``trials.csv`` (every trial, best first), ``tuning.json`` (search space,
seeds, every trial, the chosen values, flags), ``tune.md``, ``best.yaml`` (a preset fragment);
each trial's runs in ``trials/SLUG/seedS`` (resumable: finished trial runs are reused).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from flatminima._table import format_table
from flatminima.optim.registry import REGISTRY, optimizer_spec
from flatminima.studies._runs import DataCache
from flatminima.studies.executors import make_executor
from flatminima.studies.presets import Preset, arm_config, arm_optimizer, parse_grid, seed_list
from flatminima.studies.report import write_csv, write_json
from flatminima.studies.stats import is_collapsed
from flatminima.train import TrainConfig, read_summary

log = logging.getLogger(__name__)

__all__ = [
    "MIN_SEEDS",
    "MIN_VAL",
    "ArmTuning",
    "check_search_keys",
    "check_selection",
    "TuneResult",
    "grid_points",
    "planned_trials",
    "rank_trials",
    "select_best",
    "tune",
    "tune_arm",
]

#: the only metrics a trial record carries (validation and training, never test)
TRIAL_METRICS = ("val_error", "val_loss", "train_error")
MIN_SEEDS = 3
MIN_VAL = 5000


def grid_points(
    grid: Mapping[str, Sequence[Any]], max_points: int | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """Cartesian product of ``grid`` (in key order), or a seeded random subset of ``max_points``.

    Raises:
        ValueError: an empty grid, or ``max_points`` < 1 or larger than the grid.

    Example:
        >>> grid_points({"lr": [0.1, 0.2], "rho": [0.05]})
        [{'lr': 0.1, 'rho': 0.05}, {'lr': 0.2, 'rho': 0.05}]
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


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else math.inf


def select_best(trials: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The chosen trial by the module's selection rule (lowest score; ties within 1 SE of it go
    to the lowest validation loss, then the earlier trial). Marks nothing; see :func:`mark_ties`.

    Only ``val_error``, ``val_error_se``, ``val_loss`` and ``trial`` are read.

    Raises:
        ValueError: no trials, or no trial with a finite validation error.
    """
    scored = [t for t in trials if math.isfinite(_num(t["val_error"]))]
    if not scored:
        raise ValueError(
            "No trial has a finite validation error: every trial diverged or collapsed on some "
            "seed (widen or move the grid), or val_size is 0"
        )
    best = min(scored, key=lambda t: (float(t["val_error"]), _num(t["val_loss"]), t["trial"]))
    se = t_se if math.isfinite(t_se := _num(best.get("val_error_se"))) else 0.0
    tied = [t for t in scored if float(t["val_error"]) <= float(best["val_error"]) + se]
    return min(tied, key=lambda t: (_num(t["val_loss"]), t["trial"]))


def mark_ties(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Set ``tied`` and ``chosen`` on every trial record; return the chosen one."""
    chosen = select_best(trials)
    scored = [t for t in trials if math.isfinite(_num(t["val_error"]))]
    best = min(scored, key=lambda t: (float(t["val_error"]), _num(t["val_loss"]), t["trial"]))
    se = _num(best.get("val_error_se"))
    se = se if math.isfinite(se) else 0.0
    for t in trials:
        t["tied"] = bool(
            math.isfinite(_num(t["val_error"]))
            and float(t["val_error"]) <= float(best["val_error"]) + se
        )
        t["chosen"] = t["trial"] == chosen["trial"]
    return dict(chosen)


def rank_trials(trials: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Trials best first by (val_error, val_loss, trial); failed (NaN) last."""
    return sorted(trials, key=lambda t: (_num(t["val_error"]), _num(t["val_loss"]), t["trial"]))


@dataclass
class SearchSpace:
    """One arm's search: primary ``grid`` axes, follow-up axes ``then``, extension cap."""

    grid: dict[str, list[Any]]
    then: dict[str, list[Any]] = field(default_factory=dict)
    max_extend: int = 2

    @classmethod
    def parse(cls, spec: Mapping[str, Any] | str, max_extend: int = 2) -> SearchSpace:
        """``{"lr": [...], "gamma": [...], "then": {"inner_lr": [...]}}`` or a grid string.

        Raises:
            ValueError: an empty or bad grid, a forbidden key, a bad ``max_extend``.
        """
        if isinstance(spec, str):
            grid, then = parse_grid(spec), {}
        else:
            spec = dict(spec)
            then = parse_grid(dict(spec.pop("then"))) if spec.get("then") else {}
            grid = parse_grid(spec)
        for bad in ("optimizer", "seed", "val_size", "budget", "epochs"):
            if bad in grid or bad in then:
                raise ValueError(
                    f"Invalid search key {bad!r}: tune one optimizer at a fixed budget, seeds "
                    "and validation split"
                )
        if isinstance(max_extend, bool) or not isinstance(max_extend, int) or max_extend < 0:
            raise ValueError(f"Invalid max_extend {max_extend!r}: an integer >= 0")
        return cls(grid, then, max_extend)

    def to_dict(self) -> dict[str, Any]:
        return {"grid": self.grid, "then": self.then, "max_extend": self.max_extend}


def check_search_keys(space: SearchSpace, optimizer: str) -> None:
    """Refuse a search over a setting ``optimizer`` never reads: every trial would be one run.

    A key is refused when some registry optimizer reads it (its ``settings``) and
    ``optimizer`` does not (e.g. ``rho`` for ``sgd``); common settings (``lr``, ``momentum``,
    ...) are always allowed.

    Raises:
        ValueError: such a key (the message names the optimizer's own knobs), or an unknown
            optimizer.

    Example:
        >>> check_search_keys(SearchSpace({"lr": [0.1], "rho": [0.05]}), "sam")
        >>> check_search_keys(SearchSpace({"rho": [0.05]}), "sgd")
        Traceback (most recent call last):
        ...
        ValueError: Invalid search key(s) ['rho'] for sgd: it never reads them (its knobs: lr)
    """
    spec = optimizer_spec(optimizer)
    specific = set().union(*(s.settings for s in REGISTRY.values()))
    ignored = sorted(k for k in [*space.grid, *space.then] if k in specific - set(spec.settings))
    if ignored:
        knobs = ", ".join(spec.knobs + spec.follow_up_knobs)
        raise ValueError(
            f"Invalid search key(s) {ignored} for {optimizer}: it never reads them "
            f"(its knobs: {knobs})"
        )


def planned_trials(space: SearchSpace, base: TrainConfig) -> int:
    """Grid points plus follow-up values not equal to the base value (extensions apart).

    The follow-up axis is tried at the chosen grid point, whose own value of that axis (the
    base config's) needs no new run; so it counts ``len(values)`` minus one if the base value
    is among them.
    """
    n = math.prod(len(v) for v in space.grid.values())
    for key, vals in space.then.items():
        n += len(vals) - (getattr(base, key) in vals)
    return n


def _slug(point: Mapping[str, Any]) -> str:
    text = "-".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())
    return "".join(c if c.isalnum() or c in "=.-_+" else "_" for c in text)[:120]


def _step_beyond(values: list[Any], value: Any) -> Any | None:
    """The next value beyond ``value`` if it is an edge of the numeric axis ``values``."""
    nums = sorted({v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if len(nums) < 2 or len(nums) != len(set(values)) or value not in (nums[0], nums[-1]):
        return None
    edge, near = (nums[0], nums[1]) if value == nums[0] else (nums[-1], nums[-2])
    if nums[0] > 0:
        new = edge * (edge / near)
    else:
        new = edge + (edge - near)
    return int(new) if all(isinstance(v, int) for v in nums) else float(f"{new:.6g}")


@dataclass
class ArmTuning:
    """Outcome of :func:`tune_arm` (also written to ``tuning.json``).

    Attributes:
        arm: the arm label; ``space``: its search; ``seeds``: the tuning seeds.
        trials: every trial record (point, score, se, failures, ``tied``, ``chosen``, stage).
        chosen: the chosen trial's values of the searched keys.
        n_planned, n_extension: trials of the plan, and extension trials run.
        on_edge: axes whose chosen value is still on an edge after the extension cap.
        n_val: validation images; ``weak``: the selection rule's minimum was not met.
    """

    arm: str
    space: SearchSpace
    seeds: list[int]
    trials: list[dict[str, Any]]
    chosen: dict[str, Any]
    n_planned: int
    n_extension: int
    on_edge: list[str]
    n_val: int
    weak: bool
    base: dict[str, Any]
    out_dir: Path

    @property
    def optimizer(self) -> str:
        return self.arm

    @property
    def fragment(self) -> dict[str, dict[str, Any]]:
        """A preset fragment ``{arm: chosen values}`` (``best.yaml``)."""
        return {self.arm: dict(self.chosen)}

    @property
    def best(self) -> dict[str, Any]:
        """The chosen trial's record."""
        return next(t for t in self.trials if t.get("chosen"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "arm": self.arm,
            "space": self.space.to_dict(),
            "seeds": self.seeds,
            "n_planned": self.n_planned,
            "n_extension": self.n_extension,
            "on_edge": self.on_edge,
            "n_val": self.n_val,
            "weak_selection": self.weak,
            "chosen": self.chosen,
            "selection_rule": SELECTION_RULE,
            "trials": self.trials,
            "base_config": self.base,
        }


SELECTION_RULE = (
    "score = mean final validation error over the tuning seeds; a trial that diverges or "
    "collapses on any seed fails; tied = score <= best score + SE of the best; chosen = the "
    "tied trial with the lowest mean validation loss (then the earlier trial)"
)


class _Search:
    """State of one arm's search: trials so far, run through an executor stage by stage.

    Every point assigns every searched key (unsearched follow-up keys keep the base value), so
    a point's folder name ``trials/SLUG`` identifies it: a repeated point is never re-run.
    """

    def __init__(
        self,
        base: TrainConfig,
        keys: list[str],
        seeds: list[int],
        out: Path,
        executor: Any,
        n_val: int,
        num_classes: int,
    ) -> None:
        self.base, self.keys, self.seeds, self.out = base, keys, seeds, out
        self.executor = executor
        self.n_val, self.num_classes = n_val, num_classes
        self.trials: list[dict[str, Any]] = []

    def evaluate(self, points: list[dict[str, Any]], stage: str) -> int:
        """Run the points not tried yet (all seeds through the executor); return how many."""
        seen = {t["point"] for t in self.trials}
        new: list[dict[str, Any]] = []
        for p in points:
            if _slug(p) not in seen:
                seen.add(_slug(p))
                new.append(p)
        cfgs = [self.base.replace(**p) for p in new]  # invalid values fail here, naming them
        items = [
            (self.out / "trials" / _slug(p) / f"seed{s}", c.replace(seed=s))
            for p, c in zip(new, cfgs)
            for s in self.seeds
        ]
        self.executor.run(items)
        for p in new:
            self.trials.append(self._record(p, stage))
        return len(new)

    def _seed_finals(self, point: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:

        finals, failed = [], []
        for s in self.seeds:
            summary = read_summary(self.out / "trials" / _slug(point) / f"seed{s}") or {}
            final = summary.get("final", {}) if summary.get("status") == "complete" else {}
            loss = final.get("train_eval_loss", final.get("train_loss"))
            if not final:
                failed.append(f"seed {s}: {summary.get('status', 'missing')}")
            elif is_collapsed(final.get("train_error"), loss, self.num_classes):
                failed.append(f"seed {s}: collapsed")
            finals.append({k: final.get(k, math.nan) for k in TRIAL_METRICS})
        return finals, failed

    def _record(self, point: dict[str, Any], stage: str) -> dict[str, Any]:
        finals, failed = self._seed_finals(point)
        ve = np.asarray([f["val_error"] for f in finals], dtype=float)
        mean = math.nan if failed else float(ve.mean())
        if failed:
            se = math.nan
        elif len(ve) > 1:
            se = float(ve.std(ddof=1) / math.sqrt(len(ve)))
        else:  # one seed: binomial SE of an error rate on n_val images
            se = math.sqrt(mean * (1 - mean) / max(self.n_val, 1))
        with np.errstate(all="ignore"):
            vl = math.nan if failed else float(np.mean([f["val_loss"] for f in finals]))
            te = float(np.nanmean([f["train_error"] for f in finals])) if not failed else math.nan
        return {
            "trial": len(self.trials),
            "stage": stage,
            **point,
            "point": _slug(point),
            "val_error": mean,
            "val_error_se": se,
            "val_loss": vl,
            "train_error": te,
            "seeds": len(self.seeds),
            "failed": "; ".join(failed),
        }

    def extend(self, axes: Sequence[str], values: dict[str, list[Any]], cap: int) -> int:
        """Edge extension of ``axes`` around the chosen point; return trials run."""
        used = dict.fromkeys(axes, 0)
        total = 0
        while True:
            best = mark_ties(self.trials)
            todo = []
            for ax in axes:
                new = _step_beyond(values[ax], best[ax]) if used[ax] < cap else None
                if new is None:
                    continue
                try:
                    self.base.replace(**{ax: new})
                except ValueError as exc:
                    log.warning("no extension of %s beyond %r: %s", ax, best[ax], exc)
                    continue
                values[ax].append(new)
                used[ax] += 1
                todo.append({**{k: best[k] for k in self.keys}, ax: new})
            if not todo:
                return total
            total += self.evaluate(todo, "extension")


def _edges(trials: list[dict[str, Any]], values: dict[str, list[Any]]) -> list[str]:
    chosen = next(t for t in trials if t.get("chosen"))
    return [ax for ax, vals in values.items() if _step_beyond(vals, chosen[ax]) is not None]


def check_selection(n_seeds: int, n_val: int, allow_weak: bool) -> bool:
    """Whether a selection is weak (< 3 seeds and < 5000 validation images); raise unless
    ``allow_weak`` (then log a warning).

    Raises:
        ValueError: a weak selection that is not allowed (the message says what to add).
    """
    weak = n_seeds < MIN_SEEDS and n_val < MIN_VAL
    if weak:
        msg = (
            f"Tuning selection on {n_seeds} seed(s) and {n_val} validation images is mostly "
            f"noise: give >= {MIN_SEEDS} tuning seeds or >= {MIN_VAL} validation images"
        )
        if not allow_weak:
            raise ValueError(msg + " (or allow a weak selection explicitly)")
        log.warning("%s; continuing because a weak selection was allowed", msg)
    return weak


def tune_arm(
    out_dir: str | Path,
    base: TrainConfig,
    space: SearchSpace,
    seeds: Sequence[int],
    *,
    arm: str | None = None,
    executor: Any = None,
    allow_weak: bool = False,
    write: bool = True,
) -> ArmTuning:
    """Search one arm (grid, edge extension, follow-up axes; see the module docstring).

    Args:
        out_dir: output folder; trial runs in ``out_dir/trials/SLUG/seedS``.
        base: the arm's config at the budget it will be evaluated at (``val_size > 0``).
        space: the search (:class:`SearchSpace`).
        seeds: tuning seeds (keep them disjoint from evaluation seeds).
        arm: label used in the outputs (default: the optimizer).
        executor: a :mod:`flatminima.studies.executors` executor (default: serial).
        allow_weak: allow fewer than 3 seeds with fewer than 5000 validation images.
        write: write trials.csv, tuning.json, tune.md and best.yaml.

    Raises:
        ValueError: ``val_size`` 0, no seeds, a weak selection not allowed, a bad value.
    """

    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"Invalid tuning seeds {seeds!r}: distinct integers, at least one")
    if base.val_size <= 0:
        raise ValueError(
            f"Invalid val_size {base.val_size!r}: tuning needs a validation split "
            "(e.g. --val-size 0.1); the test set is never used for selection"
        )
    check_search_keys(space, base.optimizer)
    base = base.replace(evaluate_test=False)  # trials never evaluate the test set
    splits = DataCache().get(base.replace(seed=seeds[0]))
    n_val = len(splits.val) if splits.val is not None else 0
    weak = check_selection(len(seeds), n_val, allow_weak)
    keys = [*space.grid, *space.then]
    out = Path(out_dir)
    search = _Search(
        base, keys, seeds, out, executor or make_executor("serial"), n_val, splits.num_classes
    )
    fixed = {k: getattr(base, k) for k in space.then}
    search.evaluate([{**p, **fixed} for p in grid_points(space.grid)], "grid")
    values = {k: list(v) for k, v in space.grid.items()}
    n_ext = search.extend(list(space.grid), values, space.max_extend)
    for key, vals in space.then.items():
        best = mark_ties(search.trials)
        search.evaluate([{**{k: best[k] for k in keys}, key: v} for v in vals], "follow-up")
        values[key] = [*vals, *([best[key]] if best[key] not in vals else [])]
        n_ext += search.extend([key], values, space.max_extend)
    chosen = mark_ties(search.trials)
    result = ArmTuning(
        arm or base.optimizer,
        space,
        seeds,
        search.trials,
        {k: chosen[k] for k in keys},
        planned_trials(space, base),
        n_ext,
        _edges(search.trials, values),
        n_val,
        weak,
        base.to_dict(),
        out,
    )
    if write:
        write_tuning(result)
    return result


def write_tuning(result: ArmTuning) -> None:
    """``trials.csv``, ``tuning.json``, ``tune.md`` and ``best.yaml`` into ``result.out_dir``."""

    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    ranked = [dict(t) for t in rank_trials(result.trials)]
    write_csv(ranked, out / "trials.csv")
    write_json(result.to_dict(), out / "tuning.json")
    b = result.base
    head = (
        f"# chosen for {result.arm} by validation error (seeds {result.seeds}, budget "
        f"{b['budget']} {b['epochs']} epochs; {out / 'tuning.json'})\n"
    )
    (out / "best.yaml").write_text(head + yaml.safe_dump(result.fragment, sort_keys=False))
    (out / "tune.md").write_text(
        "\n".join(
            [
                f"# Tuning {result.arm}",
                "",
                *tuning_summary(result),
                "",
                format_table(ranked, trial_columns(result), markdown=True),
                "",
            ]
        )
    )
    log.info("tune %s: chose %s (%s)", result.arm, result.chosen, out / "tuning.json")


def trial_columns(result: ArmTuning) -> list[str]:
    """Columns of a trial table (searched keys, score, SE, flags; never a test metric)."""
    keys = [*result.space.grid, *result.space.then]
    return [
        "trial",
        "stage",
        *keys,
        "val_error",
        "val_error_se",
        "val_loss",
        "train_error",
        "tied",
        "chosen",
        "failed",
    ]


def tuning_summary(result: ArmTuning) -> list[str]:
    """Markdown lines: search space, effort, selection rule, chosen values, flags."""
    s = result.space
    lines = [
        f"- Search: grid {s.grid}"
        + (f", then at the chosen point {s.then}" if s.then else "")
        + f"; edge extension <= {s.max_extend} steps per axis",
        f"- Trials: {result.n_planned} planned + {result.n_extension} extension, each on "
        f"tuning seeds {result.seeds}, {result.n_val} validation images "
        f"(validation split {result.base['val_size']}; the test set is never used)",
        f"- Selection: {SELECTION_RULE}",
        f"- Chosen: `{yaml.safe_dump(result.chosen, default_flow_style=True).strip()}`",
    ]
    if result.on_edge:
        lines.append(f"- **On the edge after the extension cap**: {', '.join(result.on_edge)}")
    if result.weak:
        lines.append(
            f"- **Weak selection**: fewer than {MIN_SEEDS} seeds and fewer than "
            f"{MIN_VAL} validation images"
        )
    return lines


TuneResult = ArmTuning


def tune(
    out_dir: str | Path,
    *,
    optimizer: str,
    grid: str | Mapping[str, Any],
    then: str | Mapping[str, Any] | None = None,
    preset: Preset | None = None,
    overrides: dict[str, Any] | None = None,
    seeds: int | Sequence[int] = 3,
    max_extend: int = 2,
    allow_weak: bool = False,
    executor: Any = None,
) -> ArmTuning:
    """Tune one optimizer (or preset arm) on a validation split: :func:`tune_arm` on the arm's
    preset config with ``overrides``; ``seeds`` a count (``0..n-1``) or a list.

    Raises:
        ValueError: an unknown optimizer, a bad or empty grid, a grid key ``optimizer``,
            ``seed`` or ``val_size``, ``val_size`` of 0, or a weak selection not allowed.
    """

    arm_optimizer(preset, optimizer)
    spec: dict[str, Any] = dict(parse_grid(grid) if isinstance(grid, str) else grid)
    if then:
        spec["then"] = parse_grid(then) if isinstance(then, str) else dict(then)
    space = SearchSpace.parse(spec, max_extend)
    over = {**(overrides or {}), "progress": False}
    base = arm_config(preset, optimizer, over)
    return tune_arm(
        out_dir,
        base,
        space,
        seed_list(seeds),
        arm=optimizer,
        executor=executor,
        allow_weak=allow_weak,
    )
