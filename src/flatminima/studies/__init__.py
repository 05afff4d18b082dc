"""flatminima.studies: optimizer comparisons, tuning, flatness-generalization studies, reports.

* :func:`compare`: every (optimizer, seed) at equal gradient evaluations (or equal epochs per
  replica), paired seeds, local energy, paired differences, learning curves, report folder.
* :func:`tune`: grid search of one optimizer on a validation split; writes a preset fragment.
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
from flatminima.studies.presets import (
    Preset,
    arm_config,
    arm_optimizer,
    find_preset,
    list_presets,
    load_preset,
    parse_grid,
)
from flatminima.studies.tune import TuneResult, grid_points, select_best, tune

__all__ = [
    "BUDGET_LABELS",
    "CompareResult",
    "CorrelationResult",
    "Preset",
    "StudyResult",
    "TuneResult",
    "arm_config",
    "arm_optimizer",
    "compare",
    "compare_configs",
    "correlation_study",
    "find_preset",
    "grid_points",
    "list_presets",
    "load_study_grid",
    "load_preset",
    "paired_difference",
    "parse_budget",
    "parse_grid",
    "rank_correlation",
    "select_best",
    "summarize",
    "tune",
]
