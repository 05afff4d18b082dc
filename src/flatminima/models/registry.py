"""Model registry: build a model by name, and count parameters."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from torch import nn

from ._validation import check_input_shape, check_num_classes
from .cnn import SmallCNN
from .efficientnet import EfficientNetB0
from .mlp import MLP, parse_hidden
from .resnet import ResNet18
from .wide_resnet import WideResNet

__all__ = ["MODELS", "MODEL_KWARGS", "build_model", "count_parameters"]

logger = logging.getLogger(__name__)

#: Built-in model names accepted by :func:`build_model`.
MODELS: tuple[str, ...] = ("mlp", "cnn", "resnet18", "wrn", "efficientnet_b0")

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "resnet18": ResNet18,
    "wrn": WideResNet,
    "efficientnet_b0": EfficientNetB0,
}

#: Keyword arguments each built-in model accepts (besides input_shape and num_classes).
MODEL_KWARGS: dict[str, tuple[str, ...]] = {
    "mlp": ("hidden", "activation", "batchnorm", "dropout"),
    "cnn": ("width", "batchnorm", "dropout"),
    "resnet18": ("width",),
    "wrn": ("depth", "widen_factor", "dropout"),
    "efficientnet_b0": ("width_mult", "depth_mult", "dropout", "drop_path", "stem_stride"),
}

_EXTERNAL = {"timm": "timm", "torchvision": "torchvision"}


def _import_optional(package: str) -> ModuleType:
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ImportError(
            f"Model names '{package}:<model>' need the optional package {package!r}, which is "
            f"not installed: pip install {package}"
        ) from err


def _build_external(
    package: str, model: str, shape: tuple[int, ...], num_classes: int, kwargs: dict[str, Any]
) -> nn.Module:
    if not model:
        raise ValueError(f"Invalid model name {package + ':'!r}; expected '{package}:<model>'")
    if package == "timm":
        if len(shape) != 3:
            raise ValueError(f"Invalid input_shape for timm:{model}: {shape!r}; expected (C, H, W)")
        timm = _import_optional("timm")
        return timm.create_model(model, num_classes=num_classes, in_chans=shape[0], **kwargs)
    if len(shape) != 3 or shape[0] != 3:
        raise ValueError(
            f"Invalid input_shape for torchvision:{model}: {shape!r}; torchvision models "
            "take (3, H, W) images (use timm:<model> for other channel counts)"
        )
    torchvision = _import_optional("torchvision")
    return torchvision.models.get_model(model, num_classes=num_classes, **kwargs)


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any
) -> nn.Module:
    """Build a freshly initialised model by name.

    Built-in names (:data:`MODELS`) and the keyword arguments each accepts:

    - ``"mlp"``: :class:`~flatminima.models.MLP` -- ``hidden`` (sequence or comma string
      ``"256,256"``), ``activation``, ``batchnorm``, ``dropout``;
    - ``"cnn"``: :class:`~flatminima.models.SmallCNN` -- ``width``, ``batchnorm``, ``dropout``;
    - ``"resnet18"``: :class:`~flatminima.models.ResNet18` -- ``width``;
    - ``"wrn"``: :class:`~flatminima.models.WideResNet` -- ``depth``, ``widen_factor``,
      ``dropout``;
    - ``"efficientnet_b0"``: :class:`~flatminima.models.EfficientNetB0` -- ``width_mult``,
      ``depth_mult``, ``dropout``, ``drop_path``, ``stem_stride`` (stride 1 below 128 pixels:
      the CIFAR / Fashion-MNIST variant; 2 from 128 pixels: the ImageNet network).

    ``"timm:<model>"`` calls ``timm.create_model(model, num_classes=num_classes,
    in_chans=C, **kwargs)`` and ``"torchvision:<model>"`` calls
    ``torchvision.models.get_model(model, num_classes=num_classes, **kwargs)``; those packages
    are optional. Parameters are drawn from torch's global generator, so the same
    ``torch.manual_seed`` gives the same model.

    Args:
        name: a name from :data:`MODELS`, ``"timm:<model>"`` or ``"torchvision:<model>"``.
        input_shape: shape of one example without the batch dimension, e.g. ``(1, 28, 28)``.
        num_classes: number of output logits.
        **kwargs: model-specific keyword arguments (listed above).

    Returns:
        The model, in training mode.

    Raises:
        ValueError: on an unknown name (the message lists the valid ones), a keyword argument
            the model does not accept (the message lists those it does), or invalid values.
        ImportError: for ``timm:``/``torchvision:`` names when that package is not installed.

    Example:
        >>> model = build_model("mlp", (64,), 10, hidden="32,32")
        >>> count_parameters(model)
        3466
    """
    if not isinstance(name, str):
        raise ValueError(f"Invalid model name: {name!r}; expected a string, one of {MODELS}")
    shape = check_input_shape(input_shape)
    num_classes = check_num_classes(num_classes)
    prefix, sep, rest = name.partition(":")
    if sep and prefix.strip().lower() in _EXTERNAL:
        package = _EXTERNAL[prefix.strip().lower()]
        model = _build_external(package, rest.strip(), shape, num_classes, kwargs)
    else:
        key = name.strip().lower()
        if key not in _BUILDERS:
            raise ValueError(
                f"Unknown model name: {name!r}; valid names are {', '.join(MODELS)}, "
                "'timm:<model>' and 'torchvision:<model>'"
            )
        accepted = MODEL_KWARGS[key]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(
                f"Unknown keyword argument(s) {', '.join(map(repr, unknown))} for model "
                f"{key!r}; it accepts {', '.join(accepted)}"
            )
        if "hidden" in kwargs:
            kwargs = {**kwargs, "hidden": parse_hidden(kwargs["hidden"])}
        model = _BUILDERS[key](shape, num_classes, **kwargs)
    logger.debug(
        "built model %s for input %s, %d classes: %d parameters",
        name,
        shape,
        num_classes,
        count_parameters(model),
    )
    return model


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model`` (shared tensors counted once; buffers such as
    BatchNorm running statistics not counted).

    Args:
        model: any module.
        trainable_only: count only parameters with ``requires_grad=True``.

    Raises:
        ValueError: if ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
