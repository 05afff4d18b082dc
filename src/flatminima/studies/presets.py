"""Hyperparameter presets: YAML files that give every compared optimizer its settings.

A preset is a YAML mapping::

    study:            # optional: defaults of the comparison itself (CLI flags override them)
      optimizers: [sgd, esgd, rsgd, sam]
      seeds: 3
      budget: grad-evals          # grad-evals | epochs | both
      sigmas: [0.05, 0.1, 0.2, 0.3, 0.5]
    common:           # TrainConfig keys shared by every optimizer
      data: fashion-mnist
      model: cnn
      lr: 0.05
    sgd: {}           # per-arm mappings of TrainConfig keys, overriding ``common``
    rsgd: {lr: 0.1, num_replicas: 3}
    sgd-large-batch:  # an arm that is not an optimizer name must say which optimizer it runs
      optimizer: sgd
      batch_size: 384

An *arm* is one compared setting: its label is either an optimizer name (``sgd``, ``esgd``,
``rsgd``, ``sam``) or a preset key whose mapping names an ``optimizer``. The configuration of arm
``a`` is ``TrainConfig.from_dict({**common, **preset[a], **overrides, "optimizer": ...})``.

Presets are found by file path, else by name in ``$FLATMINIMA_CONFIGS/NAME.yaml``, else in
``./configs/NAME.yaml``, else among the presets shipped inside the package
(``flatminima/presets/*.yaml``, read through :mod:`importlib.resources`, so an installed wheel
finds them as well as a source checkout; see :func:`preset_dirs`).
"""

from __future__ import annotations

import importlib.resources
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatminima.train.config import (
    OPTIMIZER_NAMES,
    ConfigError,
    TrainConfig,
    check_key,
    coerce,
    load_yaml_file,
    parse_value,
)

log = logging.getLogger(__name__)

__all__ = [
    "STUDY_KEYS",
    "Preset",
    "arm_config",
    "arm_optimizer",
    "find_preset",
    "list_presets",
    "load_preset",
    "parse_grid",
    "parse_scalar",
    "packaged_presets_dir",
    "preset_dirs",
]

#: keys allowed in a preset's ``study:`` mapping (defaults of ``flatminima compare``)
STUDY_KEYS = (
    "optimizers",
    "seeds",
    "budget",
    "sigmas",
    "flatness_samples",
    "flatness_draws",
    "large_batch",
    "margin",  # TOST equivalence margin (error units), fixed before the run
    "tuning",  # equal-effort tuning spec (flatminima.studies.compare), or none
    "provenance",  # where fixed hyperparameters came from (tuning command and folder)
    "controls",  # compute-matched SGD / large-batch controls at equal epochs (default true)
)

_TOP_KEYS = ("study", "common", "description")


def preset_dirs() -> list[Path]:
    """Folders searched for ``NAME.yaml``: $FLATMINIMA_CONFIGS, ./configs, the package's presets."""
    dirs = []
    if os.environ.get("FLATMINIMA_CONFIGS"):
        dirs.append(Path(os.environ["FLATMINIMA_CONFIGS"]))
    dirs.append(Path.cwd() / "configs")
    dirs.append(packaged_presets_dir())
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def packaged_presets_dir() -> Path:
    """The folder of the presets shipped with the package (``flatminima/presets``)."""
    return Path(str(importlib.resources.files("flatminima.presets")))


def list_presets() -> list[str]:
    """Names of the presets found in :func:`preset_dirs` (sorted, without ``.yaml``)."""
    names: set[str] = set()
    for d in preset_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def find_preset(name_or_path: str | os.PathLike) -> Path:
    """Resolve a preset name (``fashion-quick``) or file path to an existing file.

    Raises:
        FileNotFoundError: no such file; the message lists the known preset names.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    for d in preset_dirs():
        for cand in (d / f"{name_or_path}.yaml", d / str(name_or_path)):
            if cand.is_file():
                return cand
    raise FileNotFoundError(
        f"Preset {str(name_or_path)!r} not found (searched {', '.join(map(str, preset_dirs()))}); "
        f"known presets: {', '.join(list_presets()) or '(none)'}"
    )


@dataclass
class Preset:
    """A parsed preset: shared settings, per-arm overrides and study defaults.

    Attributes:
        common: TrainConfig keys shared by every arm.
        arms: per-arm mappings (label -> TrainConfig keys overriding ``common``).
        study: defaults for the comparison (keys in :data:`STUDY_KEYS`).
        description: free text shown in reports.
        source: the file it was read from (``None`` when built in code).
    """

    common: dict[str, Any] = field(default_factory=dict)
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    study: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | None = None) -> Preset:
        """Validate a preset mapping (see the module docstring for its layout).

        Raises:
            ValueError: a non-mapping section, an unknown ``study`` key, an unknown TrainConfig
                key in ``common`` or an arm, or an arm that names no valid optimizer.
        """
        where = f" in {source}" if source else ""
        if not isinstance(values, dict):
            raise ValueError(f"A preset must be a YAML mapping{where}, got {type(values).__name__}")
        for key in ("study", "common"):
            if not isinstance(values.get(key) or {}, dict):
                raise ValueError(f"Preset section {key!r}{where} must be a mapping")
        study = dict(values.get("study") or {})
        bad = sorted(set(study) - set(STUDY_KEYS))
        if bad:
            raise ValueError(
                f"Unknown study key(s) {bad}{where}; valid study keys: {', '.join(STUDY_KEYS)}"
            )
        common = dict(values.get("common") or {})
        _check_keys(common, f"common{where}")
        arms: dict[str, dict[str, Any]] = {}
        for label, mapping in values.items():
            if label in _TOP_KEYS:
                continue
            if mapping is None:
                mapping = {}
            if not isinstance(mapping, dict):
                raise ValueError(
                    f"Preset arm {label!r}{where} must be a mapping of TrainConfig keys, "
                    f"got {mapping!r}"
                )
            mapping = dict(mapping)  # never modify the caller's mapping
            _check_keys(mapping, f"arm {label!r}{where}")
            opt = mapping.get("optimizer", label if label in OPTIMIZER_NAMES else None)
            if opt not in OPTIMIZER_NAMES:
                raise ValueError(
                    f"Preset arm {label!r}{where} names no optimizer: use one of "
                    f"{', '.join(OPTIMIZER_NAMES)} as its label or add 'optimizer: NAME'"
                )
            arms[str(label)] = dict(mapping)
        return cls(common, arms, study, str(values.get("description") or ""), source)

    def to_dict(self) -> dict[str, Any]:
        """The YAML layout (``study``, ``common``, then one mapping per arm)."""
        out: dict[str, Any] = {}
        if self.description:
            out["description"] = self.description
        if self.study:
            out["study"] = dict(self.study)
        out["common"] = dict(self.common)
        out.update({k: dict(v) for k, v in self.arms.items()})
        return out


def _check_keys(mapping: dict[str, Any], where: str) -> None:
    """Reject unknown keys and convert every value in place with the one converter of its key
    (:func:`flatminima.train.config.coerce`; YAML 1.1 reads ``1e-3`` as a string).

    Raises:
        ConfigError: an unknown key or a bad value; the message says where (file, section).
    """
    try:
        for key, value in mapping.items():
            mapping[key] = coerce(check_key(key), value)
    except ConfigError as err:
        raise ConfigError(f"{err} (in {where})") from None


def load_preset(name_or_path: str | os.PathLike) -> Preset:
    """Read and validate a preset by name or path (see :func:`find_preset`).

    Raises:
        FileNotFoundError: the preset does not exist.
        ValueError: the file is not a valid preset (see :meth:`Preset.from_dict`).
    """
    path = find_preset(name_or_path)
    values = load_yaml_file(path) or {}
    preset = Preset.from_dict(values, source=str(path))
    log.info("loaded preset %s (%d arms)", path, len(preset.arms))
    return preset


def arm_optimizer(preset: Preset | None, arm: str) -> str:
    """The optimizer an arm runs (its label, or its preset mapping's ``optimizer``).

    Raises:
        ValueError: the label is neither an optimizer nor an arm of the preset.
    """
    if preset is not None and arm in preset.arms:
        return str(preset.arms[arm].get("optimizer", arm))
    if arm in OPTIMIZER_NAMES:
        return arm
    known = list(OPTIMIZER_NAMES) + [
        a for a in (preset.arms if preset else {}) if a not in OPTIMIZER_NAMES
    ]
    raise ValueError(f"Unknown optimizer {arm!r}; valid: {', '.join(known)}")


def arm_config(
    preset: Preset | None, arm: str, overrides: dict[str, Any] | None = None, **changes: Any
) -> TrainConfig:
    """The validated :class:`TrainConfig` of ``arm``: ``common``, then the arm, then overrides.

    Args:
        preset: the preset (``None``: TrainConfig defaults).
        arm: an optimizer name or an arm label of the preset.
        overrides: TrainConfig keys that win over the preset (e.g. command-line flags).
        **changes: more overrides (applied last).

    Raises:
        ValueError: unknown arm, unknown key, or an invalid value.
    """
    optimizer = arm_optimizer(preset, arm)
    values: dict[str, Any] = {}
    if preset is not None:
        values.update(preset.common)
        values.update(preset.arms.get(arm, {}))
    values.update(overrides or {})
    values.update(changes)
    values["optimizer"] = optimizer
    return TrainConfig.from_dict(values)


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """Seeds ``0..seeds-1`` for a count, else the given distinct seeds (>= 0).

    Raises:
        ValueError: a count < 1, a bool, an empty list, repeated or negative seeds.

    Example:
        >>> seed_list(3), seed_list([4, 1])
        ([0, 1, 2], [4, 1])
    """
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


def parse_scalar(text: str) -> Any:
    """Parse one value: an int, a float (``1e-3`` included, which YAML 1.1 reads as a string),
    else like YAML (booleans, ``null``, strings); a YAML error is a one-line ``ConfigError``.

    Example:
        >>> parse_scalar("3"), parse_scalar("1e-3"), parse_scalar("true"), parse_scalar("cnn")
        (3, 0.001, True, 'cnn')
    """
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    return parse_value(text)


def parse_grid(spec: str | dict[str, Any]) -> dict[str, list[Any]]:
    """Parse a grid ``"lr=0.02,0.05;gamma=1e-3,1e-2"`` (or a mapping key -> list) into lists.

    Values are parsed by :func:`parse_scalar` (numbers such as ``1e-3``, booleans, ``null``).
    In a mapping, string values that look like numbers (YAML 1.1 reads ``1e-3`` as a string)
    are converted too. Keys must be TrainConfig fields.

    Raises:
        ValueError: an empty grid, a key that is not a TrainConfig field, a key without values,
            or a malformed item.
    """
    grid: dict[str, list[Any]] = {}
    if isinstance(spec, str):
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            if "=" not in part:
                raise ValueError(f"Invalid grid item {part!r}: expected KEY=V1,V2,...")
            key, vals = part.split("=", 1)
            grid[key.strip().replace("-", "_")] = [
                parse_scalar(v) for v in vals.split(",") if v.strip()
            ]
    elif isinstance(spec, dict):
        for key, given in spec.items():
            items = list(given) if isinstance(given, (list, tuple)) else [given]
            grid[str(key)] = [parse_scalar(v) if isinstance(v, str) else v for v in items]
    else:
        raise ValueError(f"Invalid grid {spec!r}: expected 'KEY=V1,V2;KEY2=...' or a mapping")
    if not grid:
        raise ValueError(f"Empty grid {spec!r}: give at least one KEY=V1,V2,... item")
    for key, values in grid.items():
        try:
            check_key(key)
        except ConfigError as err:
            raise ConfigError(f"Invalid grid key {key!r}: {err}") from None
        if not values:
            raise ValueError(f"Grid key {key!r} has no values")
        grid[key] = [_grid_value(key, v) for v in values]
    return grid


def _grid_value(key: str, value: Any) -> Any:
    """``coerce(key, value)``, but a whole number stays an int (``epochs: 2`` names its run
    folders ``epochs=2`` as before; the config still gets ``2.0``)."""
    out = coerce(key, value)
    keep = isinstance(value, int) and not isinstance(value, bool) and out == value
    return value if keep else out
