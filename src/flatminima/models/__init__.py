"""flatminima.models: networks for the experiments and a name-based factory.

- :class:`MLP`: fully connected network on flattened inputs.
- :class:`SmallCNN`: LeNet-like CNN, fast on a few CPU cores (Fashion-MNIST scale).
- :class:`ResNet18`: CIFAR-style ResNet-18 with a width parameter (11.2M parameters at 64).
- :class:`WideResNet`: WRN-d-k with pre-activation blocks (36.5M parameters for WRN-28-10).
- :func:`build_model`: build any of them (or a timm / torchvision model) by name.
"""

from .cnn import SmallCNN
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
    "ResNet18",
    "SmallCNN",
    "WideBasicBlock",
    "WideResNet",
    "build_model",
    "count_parameters",
    "parse_hidden",
]
