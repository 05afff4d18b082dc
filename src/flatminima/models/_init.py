"""Weight initialisation shared by the residual networks (private)."""

from __future__ import annotations

from torch import nn

__all__ = ["init_residual_network"]


def init_residual_network(model: nn.Module) -> None:
    """Kaiming-normal convolutions (fan-out, ReLU gain), BatchNorm weight 1 and bias 0.

    ``W ~ N(0, 2 / (k * k * C_out))`` as in He et al. (2016) and the reference ResNet /
    WideResNet code; linear layers keep PyTorch's default initialisation.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
