"""Gaussian-mixture theory: data model, exact errors, Bayes-optimal error, estimators, flatness.

See docs/gmm.md and docs/design.md ("Gaussian mixture"); Pittorino et al., ICLR 2021
(arXiv:2006.07897), Sec. 3; Mignacco et al., ICML 2020 (arXiv:2002.11544).
"""

from flatminima.gmm.data import GMMData, sample, sample_given_v
from flatminima.gmm.estimators import (
    ERM_LOSSES,
    LinearClassifier,
    bayes_optimal,
    erm,
    erm_hinge,
    erm_logistic,
    erm_square,
    hebbian,
    is_separable,
)
from flatminima.gmm.fastdyn import GridDynamics, GridRun, run_grid
from flatminima.gmm.flatness import (
    angle_deg,
    local_energy,
    local_energy_mc,
    perturbed_error,
    sigma_at_error,
    training_error,
)
from flatminima.gmm.free_entropy import (
    FreeEntropyResult,
    error_count,
    local_free_entropy,
    prior_delta_energy,
)
from flatminima.gmm.ranking import FLATNESS_MEASURES, kendall_by_alpha
from flatminima.gmm.replica import THEORY_LOSSES, ERMTheory, erm_learning_curve, erm_theory
from flatminima.gmm.theory import (
    H,
    bayes_optimal_bias,
    bayes_optimal_error,
    bayes_optimal_overlaps,
    classifier_error,
    generalization_error,
    overlaps,
)

__all__ = [
    "GMMData",
    "sample",
    "sample_given_v",
    "H",
    "overlaps",
    "generalization_error",
    "classifier_error",
    "bayes_optimal_overlaps",
    "bayes_optimal_bias",
    "bayes_optimal_error",
    "LinearClassifier",
    "ERM_LOSSES",
    "hebbian",
    "bayes_optimal",
    "erm",
    "erm_square",
    "erm_logistic",
    "erm_hinge",
    "is_separable",
    "training_error",
    "perturbed_error",
    "local_energy",
    "local_energy_mc",
    "sigma_at_error",
    "angle_deg",
    "GridRun",
    "GridDynamics",
    "run_grid",
    "FreeEntropyResult",
    "local_free_entropy",
    "prior_delta_energy",
    "error_count",
    "ERMTheory",
    "THEORY_LOSSES",
    "erm_theory",
    "erm_learning_curve",
    "FLATNESS_MEASURES",
    "kendall_by_alpha",
]
