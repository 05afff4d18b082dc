"""The resolved configuration of one training run.

A :class:`TrainConfig` is what a run folder's ``config.yaml`` holds: every setting that decides the
numbers a run produces. It is built from defaults, then a YAML file, then command-line overrides,
and validated once, so that a bad value fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flatminima.optim.registry import REGISTRY
from flatminima.train import values as _values
from flatminima.train.values import ConfigError, show

OPTIMIZER_NAMES = tuple(REGISTRY)  # the optimizer registry decides the valid names
LR_SCHEDULES = ("constant", "cosine", "step")
BUDGETS = ("grad-evals", "epochs")
AMP_MODES = ("none", "bf16", "fp16")
BN_MODES = ("average", "recalibrate")
REPLICA_INITS = ("independent", "same")

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
    # False: the test set is never evaluated (tuning trials: only the validation split is read)
    evaluate_test: bool = True
    eval_batch_size: int = 256
    # run
    seed: int = 0
    device: str = "cpu"
    amp: str = "none"
    deterministic: bool = True
    progress: bool = True
    tensorboard: bool = False

    def __post_init__(self) -> None:
        """Convert and check every field on its own (types and ranges; see :func:`coerce`)."""
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, coerce(f.name, getattr(self, f.name)))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a mapping and validate it.

        Raises:
            ConfigError: an unknown key (with the closest valid ones), or a bad value (the
                message names the key, the value and what is valid).
        """
        if not isinstance(values, dict):
            raise ConfigError(f"a configuration must be a mapping of keys, got {show(values)}")
        for key in values:
            check_key(key)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Load a YAML file (a mapping of config keys), then apply ``overrides``.

        Raises:
            FileNotFoundError: no such file.
            ConfigError: malformed YAML (the message names the file and the line), not a
                mapping, or a bad key or value (the message names the file).
        """
        path = Path(path)
        values = load_yaml_file(path) or {}
        if not isinstance(values, dict):
            raise ConfigError(
                f"{path}: a config file must hold a mapping of keys, got {type(values).__name__}"
            )
        try:
            for key, value in values.items():
                check_key(key)
                values[key] = coerce(key, value)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        values.update(overrides or {})
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` applied (unknown keys are a :class:`ConfigError`)."""
        for key in changes:
            check_key(key)
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def numerics(self) -> dict[str, Any]:
        """The settings that decide the numbers (what must match for a resume)."""
        return {k: v for k, v in self.to_dict().items() if k not in _PRESENTATION_KEYS}

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad value and what would be valid.

        Every field is checked on its own (:func:`coerce`), then the settings that constrain
        each other (``nesterov`` needs ``momentum > 0``, ``gamma_max >= gamma``, the largest
        coupling must fit a float32, ``grad_clip`` is not for ``amp="fp16"``).
        """
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, coerce(f.name, getattr(self, f.name)))
        if self.nesterov and self.momentum <= 0:
            raise ConfigError(
                f"nesterov=True requires momentum > 0 (momentum is {self.momentum!r})"
            )
        if self.gamma_max is not None and self.gamma_max < self.gamma:
            raise ConfigError(
                f"Invalid gamma_max value {self.gamma_max!r}; valid: a number >= gamma "
                f"(gamma={self.gamma!r}) or null"
            )
        top = self.gamma * self.gamma_growth
        if self.gamma_max is None and not top < _FLOAT32_MAX:
            raise ConfigError(
                f"Invalid gamma_growth value {self.gamma_growth!r} with gamma={self.gamma!r}: "
                f"the final coupling gamma * gamma_growth = {top:.3g} overflows float32 "
                f"(max {_FLOAT32_MAX:.3g}); valid: a smaller gamma or gamma_growth, or a gamma_max"
            )
        self._validate_grad_clip()
        if not self.evaluate_test and self.val_size <= 0:
            raise ConfigError(
                "evaluate_test=False needs a validation split (val_size > 0, e.g. 0.1): "
                "otherwise the run measures nothing held out"
            )

    def _validate_grad_clip(self) -> None:
        """``grad_clip`` is not supported with ``amp="fp16"``."""
        if self.grad_clip is not None and self.amp == "fp16":
            raise ConfigError(
                f"grad_clip={self.grad_clip!r} is not supported with amp='fp16' (the gradients "
                "would have to be unscaled inside the optimizers' closures): use amp=bf16 or none"
            )


# ---------------------------------------------------------------------- one converter per key

_FLOAT32_MAX = 3.4028234663852886e38
_SEED_MAX = 2**32 - 1


def _rng(
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = True,
    text: str = "",
) -> tuple[Callable[[Any], bool], str]:
    """A range check ``(predicate, description)``: ``low <= x < high`` by default."""

    def ok(x: Any) -> bool:
        if low is not None and (x <= low if open_low else x < low):
            return False
        return high is None or (x < high if open_high else x <= high)

    return ok, text


_POS = _rng(0, open_low=True, text="a number > 0")
_NONNEG = _rng(0, text="a number >= 0")
_AT_LEAST_1 = _rng(1, text="a whole number >= 1")
_AT_LEAST_0 = _rng(0, text="a whole number >= 0")
_FRACTION = _rng(0, 1, text="a fraction in [0, 1)")

# key -> (converter of one value, range check or None, choices or None)
_RANGES: dict[str, tuple] = {
    **dict.fromkeys(("lr", "epochs", "gamma_growth", "inner_lr", "lr_decay"), _POS),
    "gamma": _rng(0, _FLOAT32_MAX, open_low=True, text="a number in (0, 3.4e38)"),
    **dict.fromkeys(
        ("momentum", "weight_decay", "noise", "rho", "warmup_epochs", "val_size"), _NONNEG
    ),
    **dict.fromkeys(
        (
            "batch_size",
            "inner_steps",
            "num_replicas",
            "coupling_every",
            "eval_batch_size",
            "flatness_draws",
            "flatness_samples",
            "train_subset",
        ),
        _AT_LEAST_1,
    ),
    **dict.fromkeys(("eval_points", "train_eval_samples"), _AT_LEAST_0),
    "mu_decay": _FRACTION,
    "label_noise": _FRACTION,
    "grad_clip": _rng(0, open_low=True, text="null or a number > 0 (max gradient L2 norm)"),
    "gamma_max": _rng(0, _FLOAT32_MAX, open_low=True, text="null or a number in (0, 3.4e38)"),
    "seed": _rng(0, _SEED_MAX, open_high=False, text=f"a whole number in [0, {_SEED_MAX}]"),
    "lr_milestones": _rng(0, 1, open_low=True, text="fractions of the run in (0, 1)"),
    "flatness_sigmas": _rng(0, text="noise strengths >= 0"),
    "flatness_epochs": _rng(-1, text="epochs >= 1 (or -1: the last), e.g. 1,5,-1"),
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": OPTIMIZER_NAMES,
    "lr_schedule": LR_SCHEDULES,
    "budget": BUDGETS,
    "amp": AMP_MODES,
    "bn": BN_MODES,
    "replica_init": REPLICA_INITS,
}


@functools.lru_cache(maxsize=1)
def _converters() -> dict[str, Callable[[str, Any], Any]]:
    """key -> converter of a whole value, from the dataclass's type hints."""
    scalar = {
        float: _values.to_float,
        int: _values.to_int,
        bool: _values.to_bool,
        str: _values.to_str,
    }
    out: dict[str, Callable[[str, Any], Any]] = {}
    for key, hint in typing.get_type_hints(TrainConfig).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if hint in scalar:
            out[key] = scalar[hint]
        elif typing.get_origin(hint) is list:
            out[key] = functools.partial(_list_value, convert=scalar[args[0]])
        elif typing.get_origin(hint) is dict:
            out[key] = _values.to_mapping
        elif len(args) == 1 and args[0] in scalar:  # X | None
            out[key] = _values.to_optional(scalar[args[0]])
        else:  # pragma: no cover - a new field of an unsupported type
            raise TypeError(f"TrainConfig.{key}: no converter for type {hint}")
    return out


def _list_value(key: str, value: Any, convert: Callable[[str, Any], Any]) -> list[Any]:
    return _values.to_list(key, value, convert)


def config_keys() -> tuple[str, ...]:
    """The valid configuration keys (the fields of :class:`TrainConfig`)."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig))


def check_key(key: Any) -> str:
    """Return ``key`` if it is a config key, else raise naming the closest valid keys.

    Raises:
        ConfigError: not a config key (``--set learning_rate=...``).
    """
    keys = config_keys()
    if isinstance(key, str) and key in keys:
        return key
    near = difflib.get_close_matches(str(key).lower().replace("-", "_"), keys, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    raise ConfigError(f"Unknown config key {show(key)}; {hint}valid keys: {', '.join(keys)}")


def coerce(key: str, value: Any) -> Any:
    """Convert ``value`` to the type of config key ``key`` and check its range.

    This is the one conversion every source of settings goes through (flags, ``--set``,
    ``--config`` files, presets, ``TrainConfig(...)``).

    Raises:
        ConfigError: unknown key, wrong type, nan/inf, out of range, or not a valid choice;
            one line naming the key, the value and what is valid.

    Example:
        >>> coerce("lr", "1E-3"), coerce("flatness_sigmas", "0.1,0.2"), coerce("gamma_max", "null")
        (0.001, [0.1, 0.2], None)
    """
    out = _converters()[check_key(key)](key, value)
    if key in _CHOICES and out not in _CHOICES[key]:
        raise _values.fail(key, value, ", ".join(_CHOICES[key]))
    if key in _RANGES and out is not None:
        ok, text = _RANGES[key]
        for item in out if isinstance(out, list) else [out]:
            if not ok(item):
                raise _values.fail(key, value, text)
    if key == "val_size" and out >= 1 and not float(out).is_integer():
        raise _values.fail(key, value, "a fraction in [0, 1) or a whole number of samples")
    return out


def load_yaml_file(path: str | Path) -> Any:
    """Read a YAML file; a syntax error becomes one line naming the file and the line.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: malformed YAML (``FILE:LINE:COLUMN: problem``) or undecodable bytes.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise FileNotFoundError(f"YAML file {what}: {path}")
    try:
        with path.open(encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = err.problem or err.context or "syntax error"
        raise ConfigError(f"{where}: malformed YAML: {_values.one_line(problem)}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: malformed YAML: {_values.one_line(err)}") from None


def parse_value(text: str) -> Any:
    """Parse a value the way YAML would (numbers, bools, lists, null), but read ``1e-3`` as a
    number; a parse error becomes a one-line :class:`ConfigError`.

    Example:
        >>> parse_value("1e-3"), parse_value("true"), parse_value("[1, 2]")
        (0.001, True, [1, 2])
    """
    return _values.number_or_text(_values.yaml_scalar(text))


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``KEY=VALUE`` (``--set``): a checked key (dashes read as underscores) and the raw
    text of the value, converted later by :func:`coerce` like every other source.

    Raises:
        ConfigError: no ``=``, or an unknown key.
    """
    key, eq, text = item.partition("=")
    if not eq:
        raise ConfigError(f"Invalid --set {show(item)}: expected KEY=VALUE, e.g. lr=0.1")
    return check_key(key.strip().replace("-", "_")), text.strip()
