"""Conversion of configuration values, one function per value type.

Every way a setting enters a run (a command-line flag, ``--set KEY=VALUE``, a ``--config`` YAML
file, a preset, ``TrainConfig(...)`` in Python) passes through these converters, so that a value
means the same thing wherever it was written:

* numbers written as text parse as numbers: ``1e-3``, ``1E-3``, ``.5`` and ``5.`` are floats
  (YAML 1.1, which PyYAML implements, reads ``1e-3`` as a *string*);
* booleans are never numbers (``lr: true`` is an error, not ``lr = 1.0``); ``nan`` and ``inf``
  are refused;
* list settings take a list, a comma-separated string ``"0.1,0.2"`` or a YAML list ``"[0.1, 0.2]"``.

A bad value raises :class:`ConfigError`, a ``ValueError`` whose message is one line naming the
key, the value and what is valid.

Example:
    >>> to_float("lr", "1e-3"), to_int("seed", "7"), to_bool("augment", "yes")
    (0.001, 7, True)
    >>> to_list("flatness_sigmas", "0.1,0.2", to_float)
    [0.1, 0.2]
    >>> to_mapping("model_kwargs", "width=16,dropout=1e-1")
    {'width': 16, 'dropout': 0.1}
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "show",
    "to_bool",
    "to_float",
    "to_int",
    "to_list",
    "to_mapping",
    "to_optional",
    "to_str",
    "yaml_scalar",
]

_TRUE = frozenset({"true", "yes", "on"})
_FALSE = frozenset({"false", "no", "off"})
NULL_WORDS = frozenset({"", "null", "none", "~"})


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message is one line."""


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` on one line, shortened to about ``limit`` characters."""
    text = repr(value).replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fail(key: str, value: Any, valid: str, why: str = "") -> ConfigError:
    """The error for ``key = value``: ``Invalid KEY value V (why); valid: WHAT``."""
    reason = f" ({why})" if why else ""
    return ConfigError(f"Invalid {key} value {show(value)}{reason}; valid: {valid}")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def to_float(key: str, value: Any) -> float:
    """A finite float from a number or a numeric string; booleans, nan and inf are refused."""
    valid = "a finite number, e.g. 0.05 or 1e-3"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise fail(key, value, valid, _kind(value))
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        raise fail(key, value, valid, _not_a_number(value)) from None
    if not math.isfinite(number):
        raise fail(key, value, valid, "not finite")
    return number


def to_int(key: str, value: Any) -> int:
    """An int from an int, a whole float (``3.0``) or a string (``"3"``, ``"1e3"``)."""
    valid = "a whole number, e.g. 3"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise fail(key, value, valid, _kind(value))
    if isinstance(value, int):
        return value
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str):
        try:
            return int(text)
        except ValueError:
            pass
    try:
        number = float(text)
    except ValueError:
        raise fail(key, value, valid, _not_a_number(value)) from None
    if not math.isfinite(number) or not number.is_integer():
        raise fail(key, value, valid, "not a whole number")
    return int(number)


def _not_a_number(value: Any) -> str:
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return "a boolean, not a number"
    return "not a number"


def to_bool(key: str, value: Any) -> bool:
    """A bool from a bool or one of true/false/yes/no/on/off (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise fail(key, value, "true or false", "" if isinstance(value, str) else _kind(value))


def to_str(key: str, value: Any) -> str:
    """A string (a path is turned into its string)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, str):
        raise fail(key, value, "a string", _kind(value))
    return value


def to_optional(convert: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    """``convert`` that also takes ``None`` (or the text null, none, ~ or nothing)."""

    def optional(key: str, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in NULL_WORDS):
            return None
        return convert(key, value)

    return optional


def yaml_scalar(text: str, key: str = "", valid: str = "a YAML value") -> Any:
    """Parse a YAML value; a parse error becomes a one-line :class:`ConfigError` naming ``key``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "syntax error"
        mark = getattr(err, "problem_mark", None)
        where = f" at column {mark.column + 1}" if mark is not None else ""
        why = f"malformed YAML: {one_line(problem)}{where}"
        if key:
            raise fail(key, text, valid, why) from None
        raise ConfigError(f"cannot parse {show(text)}: {why}") from None


def to_list(key: str, value: Any, convert: Callable[[str, Any], Any]) -> list[Any]:
    """A list of converted items from a list, ``"a,b"``, ``"[a, b]"`` or a single item."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = yaml_scalar(text, key, "a list such as 0.1,0.2 or [0.1, 0.2]")
            if not isinstance(value, list):
                raise fail(key, text, "a list such as 0.1,0.2 or [0.1, 0.2]")
        else:
            value = [p for p in (q.strip() for q in text.split(",")) if p]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    return [convert(key, item) for item in value]


def to_mapping(key: str, value: Any) -> dict[str, Any]:
    """A mapping with string keys from a dict, a YAML mapping ``"{a: 1}"`` or ``"a=1,b=x"``.

    Values given as text are parsed like YAML (``"16"`` -> 16, ``"true"`` -> True).
    """
    valid = "a mapping such as 'width=16,batchnorm=true' or '{width: 16}'"
    if isinstance(value, str):
        text = value.strip()
        if not text or text.lower() in NULL_WORDS:
            return {}
        if text.startswith("{"):
            value = yaml_scalar(text, key, valid)
        else:
            value = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                name, eq, item = part.partition("=")
                if not eq or not name.strip():
                    raise fail(key, part, valid, "expected NAME=VALUE")
                value[name.strip()] = yaml_scalar(item, key, valid) if item.strip() else item
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise fail(key, value, valid, _kind(value))
    return {k: number_or_text(v) for k, v in value.items()}


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def number_or_text(value: Any) -> Any:
    """A string that spells a decimal number (``1e-3``, ``.5``) as a float, else unchanged."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return value


def one_line(err: BaseException | str) -> str:
    """An exception's message folded onto one line (whitespace runs become one space)."""
    return " ".join(str(err).split())
