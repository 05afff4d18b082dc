"""flatminima.models: networks for the experiments and a name-based factory.

- :class:`MLP`: fully connected network on flattened inputs.
- :class:`SmallCNN`: LeNet-like CNN, fast on a few CPU cores (Fashion-MNIST scale).
- :class:`ResNet18`: CIFAR-style ResNet-18 with a width parameter (11.2M parameters at 64).
- :class:`WideResNet`: WRN-d-k with pre-activation blocks (36.5M parameters for WRN-28-10).
- :class:`EfficientNetB0`: EfficientNet-B0 with MBConv/SE blocks and stochastic depth (5.3M
  parameters at 224 px, 1000 classes; stem stride 1 for CIFAR-size images).
- :func:`build_model`: build any of them (or a timm / torchvision model) by name.
"""

from .cnn import SmallCNN
from .efficientnet import DropPath, EfficientNetB0, MBConv, SqueezeExcitation
from .mlp import ACTIVATIONS, MLP, parse_hidden
from .registry import MODEL_KWARGS, MODELS, build_model, count_parameters
from .resnet import BasicBlock, ResNet18
from .wide_resnet import WideBasicBlock, WideResNet

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "MODELS",
    "MODEL_KWARGS",
    "BasicBlock",
    "DropPath",
    "EfficientNetB0",
    "MBConv",
    "ResNet18",
    "SmallCNN",
    "SqueezeExcitation",
    "WideBasicBlock",
    "WideResNet",
    "build_model",
    "count_parameters",
    "parse_hidden",
]
