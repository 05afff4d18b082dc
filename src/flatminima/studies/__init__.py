"""flatminima.studies: optimizer comparisons, tuning, flatness-generalization studies, reports.

* :func:`compare`: the fair protocol, plan -> tune -> run (through an executor) -> collect ->
  aggregate -> report: equal-effort tuning on seeds disjoint from the evaluation seeds, every
  (optimizer, seed) at equal gradient evaluations (or equal epochs per replica, with
  compute-matched SGD controls), collapsed runs flagged, paired t / sign-flip tests with Holm
  adjustment, TOST equivalence, paired flatness tests (also at matched training error).
* :func:`tune`: equal-effort search of one optimizer on a validation split (grid, edge
  extension, follow-up axes; SE per trial and a stated tie rule); writes a preset fragment.
* :mod:`~flatminima.studies.stats`: the paired statistics; :mod:`~flatminima.studies.executors`:
  where runs train (this process, a local process pool, submitit/SLURM).
* :func:`correlation_study`: many networks over a grid; Kendall tau / Spearman rho (bootstrap
  intervals) between flatness measures and test error / generalization gap.
* :func:`load_preset` / :func:`arm_config`: YAML presets of hyperparameters (shipped in
  ``flatminima/presets/*.yaml``).

Every study trains into run folders and is resumable: re-running skips finished runs and cached
measurements.
"""

from flatminima.studies.compare import (
    BUDGET_LABELS,
    CompareResult,
    compare,
    compare_configs,
    paired_difference,
    parse_budget,
    summarize,
)
from flatminima.studies.correlation import (
    CorrelationResult,
    StudyResult,
    correlation_study,
    load_study_grid,
    rank_correlation,
)
from flatminima.studies.executors import (
    Executor,
    LocalPoolExecutor,
    SerialExecutor,
    SubmititExecutor,
    make_executor,
)
from flatminima.studies.presets import (
    Preset,
    arm_config,
    arm_optimizer,
    find_preset,
    list_presets,
    load_preset,
    parse_grid,
)
from flatminima.studies.stats import holm, is_collapsed, paired_test, sign_flip_p, tost_p
from flatminima.studies.tune import TuneResult, grid_points, select_best, tune, tune_arm

__all__ = [
    "BUDGET_LABELS",
    "CompareResult",
    "CorrelationResult",
    "Executor",
    "LocalPoolExecutor",
    "Preset",
    "SerialExecutor",
    "StudyResult",
    "SubmititExecutor",
    "TuneResult",
    "arm_config",
    "arm_optimizer",
    "compare",
    "compare_configs",
    "correlation_study",
    "find_preset",
    "grid_points",
    "holm",
    "is_collapsed",
    "list_presets",
    "load_study_grid",
    "load_preset",
    "make_executor",
    "paired_difference",
    "paired_test",
    "parse_budget",
    "parse_grid",
    "rank_correlation",
    "select_best",
    "sign_flip_p",
    "summarize",
    "tost_p",
    "tune",
    "tune_arm",
]
