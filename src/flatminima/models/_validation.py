"""Validation of constructor arguments shared by the model classes (private)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

__all__ = [
    "check_dropout",
    "check_flag",
    "check_input_shape",
    "check_num_classes",
    "check_positive_int",
    "image_shape",
]


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` as an ``int`` if it is a positive integer, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r}; expected a positive integer")
    return int(value)


def check_num_classes(num_classes: object) -> int:
    """Return ``num_classes`` as an ``int`` (>= 1), else raise ``ValueError``."""
    return check_positive_int("num_classes", num_classes)


def check_dropout(dropout: object) -> float:
    """Return ``dropout`` as a ``float`` in ``[0, 1)``, else raise ``ValueError``."""
    if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0 <= float(dropout) < 1:
        raise ValueError(f"Invalid dropout: {dropout!r}; expected a probability in [0, 1)")
    return float(dropout)


def check_flag(name: str, value: object) -> bool:
    """Return ``value`` if it is a ``bool``, else raise ``ValueError``."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r}; expected True or False")
    return value


def check_input_shape(input_shape: object) -> tuple[int, ...]:
    """Return ``input_shape`` (one example's shape, no batch dimension) as a tuple of ints.

    Raises:
        ValueError: if ``input_shape`` is not a non-empty sequence of positive integers.
    """
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise ValueError(
            f"Invalid input_shape: {input_shape!r}; expected a non-empty sequence of positive "
            "integers without the batch dimension, e.g. (1, 28, 28) or (64,)"
        )
    if len(input_shape) == 0 or any(
        isinstance(d, bool) or not isinstance(d, Integral) or d < 1 for d in input_shape
    ):
        raise ValueError(
            f"Invalid input_shape: {tuple(input_shape)!r}; expected a non-empty sequence of "
            "positive integers without the batch dimension, e.g. (1, 28, 28) or (64,)"
        )
    return tuple(int(d) for d in input_shape)


def image_shape(input_shape: Sequence[int], model: str) -> tuple[int, int, int]:
    """Map one example's shape to the ``(C, H, W)`` image shape a convolutional model sees.

    ``(C, H, W)`` is kept, ``(H, W)`` becomes ``(1, H, W)``, and a flat ``(D,)`` with
    ``D = s * s`` a perfect square becomes ``(1, s, s)`` (e.g. the 64 features of the 8x8
    scikit-learn digits).

    Raises:
        ValueError: for any other shape, naming ``model``.
    """
    shape = check_input_shape(input_shape)
    if len(shape) == 3:
        return shape[0], shape[1], shape[2]
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        if side * side == shape[0]:
            return 1, side, side
    raise ValueError(
        f"Invalid input_shape for {model}: {shape!r}; expected (C, H, W), (H, W) or a flat "
        "(D,) with D a perfect square (read as a 1 x sqrt(D) x sqrt(D) image)"
    )
