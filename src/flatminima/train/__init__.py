"""Training: one loop for every algorithm, run folders, budgets, exact resume."""

from flatminima.train.algorithms import ALGORITHMS, Algorithm, build_algorithm
from flatminima.train.config import TrainConfig
from flatminima.train.evaluate import evaluate, evaluate_ensemble
from flatminima.train.loop import (
    DivergenceError,
    Plan,
    ResumeMismatchError,
    Trainer,
    load_run,
    make_plan,
    read_summary,
    train,
)
from flatminima.train.run_folder import RunFileError, RunFolder, RunFolderError, RunFolderLocked

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "DivergenceError",
    "Plan",
    "ResumeMismatchError",
    "RunFileError",
    "RunFolder",
    "RunFolderError",
    "RunFolderLocked",
    "TrainConfig",
    "Trainer",
    "build_algorithm",
    "evaluate",
    "evaluate_ensemble",
    "load_run",
    "make_plan",
    "read_summary",
    "train",
]
