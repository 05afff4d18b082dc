"""Fully connected network (multi-layer perceptron)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

from torch import nn

from ._validation import check_dropout, check_flag, check_input_shape, check_num_classes

__all__ = ["ACTIVATIONS", "MLP", "parse_hidden"]

#: Activation names accepted by :class:`MLP`, mapped to their module classes.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
}


def parse_hidden(hidden: Sequence[int] | str | int) -> tuple[int, ...]:
    """Parse hidden-layer widths given as a sequence, a single int or a comma string.

    ``"256,256"`` (as written on the command line or in YAML) and ``[256, 256]`` both give
    ``(256, 256)``; ``""`` and ``()`` give no hidden layer (a linear model).

    Raises:
        ValueError: if a width is not a positive integer.
    """
    if isinstance(hidden, str):
        parts = [p.strip() for p in hidden.split(",") if p.strip()]
        try:
            widths: list[object] = [int(p) for p in parts]
        except ValueError:
            raise ValueError(
                f"Invalid hidden: {hidden!r}; expected comma-separated positive integers "
                "such as '256,256'"
            ) from None
    elif isinstance(hidden, Integral) and not isinstance(hidden, bool):
        widths = [hidden]
    elif isinstance(hidden, Sequence):
        widths = list(hidden)
    else:
        raise ValueError(
            f"Invalid hidden: {hidden!r}; expected a sequence of positive integers or a "
            "comma string such as '256,256'"
        )
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, Integral) or w < 1:
            raise ValueError(f"Invalid hidden: {hidden!r}; width {w!r} is not a positive integer")
    return tuple(int(w) for w in widths)  # type: ignore[call-overload]


class MLP(nn.Sequential):
    r"""Multi-layer perceptron on flattened inputs.

    With hidden widths ``hidden = (h_1, ..., h_L)`` and activation ``phi``, an input ``x`` of
    shape ``(B, *input_shape)`` is flattened to ``z_0`` of shape ``(B, D)``,
    ``D = prod(input_shape)``, and

    .. math::
        z_l = \mathrm{drop}(\phi(\mathrm{BN}(W_l z_{l-1} + b_l))),\quad l = 1..L,
        \qquad \mathrm{logits} = W_{L+1} z_L + b_{L+1},

    where ``BN`` (``BatchNorm1d``) is present only with ``batchnorm=True`` (the linear layer
    before it then has no bias, which BN would cancel) and ``drop`` only with ``dropout > 0``.
    ``hidden=()`` gives a linear (multinomial logistic) model. Initialisation is PyTorch's
    default. The module is an ``nn.Sequential`` of standard layers, so it works with
    ``torch.func.functional_call`` and ``vmap`` (BatchNorm in eval mode; dropout in train mode
    needs ``vmap(..., randomness="different")``).

    Args:
        input_shape: shape of one example without the batch dimension, e.g. ``(1, 28, 28)``.
        num_classes: number of output logits.
        hidden: hidden-layer widths; a sequence, a single int, or a comma string ``"256,256"``.
        activation: one of :data:`ACTIVATIONS` (``"relu"``, ``"tanh"``, ``"gelu"``, ``"silu"``,
            ``"elu"``, ``"leaky_relu"``, ``"sigmoid"``).
        batchnorm: insert ``BatchNorm1d`` after each hidden linear layer.
        dropout: dropout probability after each hidden activation, in ``[0, 1)``.

    Raises:
        ValueError: on an invalid shape, width, activation name or dropout probability.

    Example:
        >>> import torch
        >>> model = MLP((1, 28, 28), 10, hidden="128,64")
        >>> model(torch.zeros(5, 1, 28, 28)).shape
        torch.Size([5, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] | str | int = (256, 256),
        activation: str = "relu",
        batchnorm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        shape = check_input_shape(input_shape)
        num_classes = check_num_classes(num_classes)
        widths = parse_hidden(hidden)
        if not isinstance(activation, str) or activation.lower() not in ACTIVATIONS:
            raise ValueError(
                f"Invalid activation: {activation!r}; expected one of {sorted(ACTIVATIONS)}"
            )
        batchnorm = check_flag("batchnorm", batchnorm)
        dropout = check_dropout(dropout)
        act = ACTIVATIONS[activation.lower()]

        layers: list[nn.Module] = [nn.Flatten(1)]
        fan_in = math.prod(shape)
        for width in widths:
            layers.append(nn.Linear(fan_in, width, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(act())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes))
        super().__init__(*layers)
        self.input_shape: tuple[int, ...] = shape
        self.num_classes: int = num_classes
        self.hidden: tuple[int, ...] = widths
