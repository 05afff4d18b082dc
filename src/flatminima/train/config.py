"""The resolved configuration of one training run.

A :class:`TrainConfig` is what a run folder's ``config.yaml`` holds: every setting that decides the
numbers a run produces. It is built from defaults, then a YAML file, then command-line overrides,
and validated once, so that a bad value fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

OPTIMIZER_NAMES = ("sgd", "esgd", "rsgd", "sam")
LR_SCHEDULES = ("constant", "cosine", "step")
BUDGETS = ("grad-evals", "epochs")
AMP_MODES = ("none", "bf16", "fp16")
BN_MODES = ("average", "recalibrate")

# Settings that change nothing about the numbers a run produces; a resumed run may differ in them.
_PRESENTATION_KEYS = frozenset({"progress", "tensorboard", "device", "eval_batch_size"})


@dataclass
class TrainConfig:
    """Every setting of a training run (see ``flatminima train --help`` for the flags).

    Budget semantics: ``epochs`` is the budget. With ``budget="grad-evals"`` (the default) it is a
    number of passes over the training set counted in gradient evaluations (samples through
    backward, summed over replicas and inner/ascent passes), so every algorithm gets the same
    compute: SGD runs ``epochs`` epochs, SAM ``epochs / 2``, rSGD with y replicas ``epochs / y``
    epochs per replica, eSGD ``epochs`` epochs of data (``epochs / inner_steps`` epochs of outer
    steps). With ``budget="epochs"`` every model copy sees ``epochs`` epochs of data (the paper's
    per-replica epochs: parallel wall-clock), whatever that costs.
    """

    # data
    data: str = "fashion-mnist"
    data_root: str | None = None
    data_kwargs: dict[str, Any] = field(default_factory=dict)  # synthetic sets: num_train, dim...
    val_size: float = 0.0
    train_subset: int | None = None
    label_noise: float = 0.0
    augment: bool = False  # True: the data set's standard augmentation (crop + flip for images)
    # model
    model: str = "cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # optimisation
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    batch_size: int = 128
    epochs: float = 10.0
    budget: str = "grad-evals"
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of the run
    lr_decay: float = 0.1
    # max global L2 norm of each minibatch gradient, per network / per replica; None: no clipping
    grad_clip: float | None = None
    # coupling (eSGD, rSGD): gamma_t = gamma * (1 + gamma1)^t, grown by `gamma_growth` over the run
    gamma: float = 1e-3
    gamma_growth: float = 1.0
    gamma_max: float | None = None
    # Entropy-SGD
    inner_steps: int = 5
    inner_lr: float = 0.1
    noise: float = 1e-4
    mu_decay: float = 0.75
    scale_by_gamma: bool = True
    # Replicated-SGD
    num_replicas: int = 3
    coupling_every: int = 1
    replica_init: str = "independent"
    bn: str = "average"
    # SAM
    rho: float = 0.05
    adaptive: bool = False
    # flatness logged during training
    flatness_epochs: list[int] = field(default_factory=list)
    flatness_sigmas: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    flatness_draws: int = 5
    flatness_samples: int = 2000
    # evaluation
    eval_points: int = 0  # evaluations (metrics rows, checkpoints) over the run; 0: every epoch
    train_eval_samples: int = 10000  # training error measured on this many samples (0: all)
    eval_batch_size: int = 256
    # run
    seed: int = 0
    device: str = "cpu"
    amp: str = "none"
    deterministic: bool = True
    progress: bool = True
    tensorboard: bool = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a mapping, rejecting unknown keys with the list of valid ones."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(
                f"Unknown config key(s) {unknown}; valid keys are: {', '.join(sorted(valid))}"
            )
        cfg = cls(**{k: v for k, v in values.items()})
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Load a YAML file (a mapping of config keys), then apply ``overrides``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file not found: {path}")
        with path.open() as fh:
            values = yaml.safe_load(fh) or {}
        if not isinstance(values, dict):
            raise ValueError(f"Config file {path} must hold a mapping of keys, got {type(values)}")
        values.update(overrides or {})
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def numerics(self) -> dict[str, Any]:
        """The settings that decide the numbers (what must match for a resume)."""
        return {k: v for k, v in self.to_dict().items() if k not in _PRESENTATION_KEYS}

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value and what would be valid."""

        def choice(name: str, options: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in options:
                raise ValueError(f"Invalid {name}: {value!r}; valid: {', '.join(options)}")

        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            ok = ok and (value >= 0 if allow_zero else value > 0)
            if not ok:
                rel = ">= 0" if allow_zero else "> 0"
                raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number {rel})")

        choice("optimizer", OPTIMIZER_NAMES)
        choice("lr_schedule", LR_SCHEDULES)
        choice("budget", BUDGETS)
        choice("amp", AMP_MODES)
        choice("bn", BN_MODES)
        choice("replica_init", ("independent", "same"))
        for name in (
            "lr",
            "batch_size",
            "epochs",
            "gamma",
            "gamma_growth",
            "inner_steps",
            "inner_lr",
            "num_replicas",
            "coupling_every",
            "eval_batch_size",
            "flatness_draws",
        ):
            positive(name)
        for name in (
            "momentum",
            "weight_decay",
            "noise",
            "rho",
            "warmup_epochs",
            "train_eval_samples",
            "flatness_samples",
            "val_size",
            "eval_points",
        ):
            positive(name, allow_zero=True)
        self._validate_grad_clip()
        if self.val_size >= 1 and int(self.val_size) != self.val_size:
            raise ValueError(
                f"Invalid val_size value: {self.val_size!r} (a fraction in [0, 1) "
                "or a whole number of samples)"
            )
        if not 0 <= self.mu_decay < 1:
            raise ValueError(f"Invalid mu_decay value: {self.mu_decay!r} (must be in [0, 1))")
        if not 0 <= self.label_noise < 1:
            raise ValueError(f"Invalid label_noise value: {self.label_noise!r} (must be in [0, 1))")
        if self.nesterov and self.momentum <= 0:
            raise ValueError("nesterov=True requires momentum > 0")
        if self.gamma_max is not None and self.gamma_max < self.gamma:
            raise ValueError(
                f"Invalid gamma_max value: {self.gamma_max!r} (must be >= gamma={self.gamma})"
            )
        for name in ("batch_size", "inner_steps", "num_replicas", "coupling_every", "seed"):
            if int(getattr(self, name)) != getattr(self, name):
                raise ValueError(
                    f"Invalid {name} value: {getattr(self, name)!r} (must be an integer)"
                )
        if any(not 0 < m < 1 for m in self.lr_milestones):
            raise ValueError(
                f"Invalid lr_milestones {self.lr_milestones!r}: fractions of the run in (0, 1)"
            )
        if any(s < 0 for s in self.flatness_sigmas):
            raise ValueError(f"Invalid flatness_sigmas {self.flatness_sigmas!r}: must be >= 0")
        if self.train_subset is not None and self.train_subset < 1:
            raise ValueError(f"Invalid train_subset value: {self.train_subset!r} (must be >= 1)")
        if not isinstance(self.data_kwargs, dict):
            raise ValueError(f"Invalid data_kwargs {self.data_kwargs!r}: must be a mapping")
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"Invalid model_kwargs {self.model_kwargs!r}: must be a mapping")

    def _validate_grad_clip(self) -> None:
        """``grad_clip``: None or a finite number > 0, and not with ``amp="fp16"``."""
        value = self.grad_clip
        if value is None:
            return
        ok = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
        )
        if not ok:
            raise ValueError(
                f"Invalid grad_clip value: {value!r} (must be None or a finite number > 0, "
                "the max L2 norm of each minibatch gradient)"
            )
        if self.amp == "fp16":
            raise ValueError(
                f"grad_clip={value!r} is not supported with amp='fp16' (the gradients would "
                "have to be unscaled inside the optimizers' closures): use amp=bf16 or none"
            )


def parse_value(text: str) -> Any:
    """Parse a ``key=value`` override value the way YAML would (numbers, bools, lists, null)."""
    return yaml.safe_load(text)
