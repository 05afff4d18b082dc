"""CIFAR-style ResNet-18 with a width parameter."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._init import init_residual_network
from ._validation import check_input_shape, check_num_classes, check_positive_int, image_shape

__all__ = ["BasicBlock", "ResNet18"]


class BasicBlock(nn.Module):
    r"""Post-activation residual block of He et al. (2016).

    ``y = relu(BN(conv3x3(relu(BN(conv3x3_s(x))))) + shortcut(x))``, where ``s`` is the stride
    and ``shortcut`` is the identity, or ``BN(conv1x1_s(x))`` when the stride or the channel
    count changes (option B of the paper).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution and of the projection shortcut.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No in-place ops: keeps the block usable under torch.func transforms.
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    r"""CIFAR-style ResNet-18 (He et al., "Deep Residual Learning for Image Recognition", 2016).

    Stem ``relu(BN(conv3x3(x)))`` with stride 1 and no max-pool (the CIFAR variant used by the
    entropic-algorithms paper, Pittorino et al. 2021, and common CIFAR code), then four stages
    of two :class:`BasicBlock` each with ``w, 2w, 4w, 8w`` channels (``w = width``) and strides
    ``1, 2, 2, 2``, global average pooling and a linear layer ``8w -> num_classes``.
    ``width=64`` is the standard network: 11,173,962 parameters for 10 classes; ``width=16``
    has about 1/16 of the parameters and cost.

    Initialisation: convolutions Kaiming-normal (fan-out, ReLU gain), BatchNorm weight 1 and
    bias 0, the linear layer PyTorch's default. Inputs may be ``(C, H, W)``, ``(H, W)`` or flat
    ``(D,)`` with ``D`` a perfect square (read as ``1 x sqrt(D) x sqrt(D)``); any spatial size
    works thanks to the adaptive pooling. Works with ``torch.func.functional_call`` and
    ``vmap`` with BatchNorm in eval mode.

    Args:
        input_shape: shape of one example without the batch dimension, e.g. ``(3, 32, 32)``.
        num_classes: number of output logits.
        width: channels ``w`` of the first stage.

    Raises:
        ValueError: on an invalid shape, class count or width.

    Example:
        >>> import torch
        >>> model = ResNet18((3, 32, 32), 10, width=16)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 64) -> None:
        super().__init__()
        shape = check_input_shape(input_shape)
        channels, height, wide = image_shape(shape, "resnet18")
        num_classes = check_num_classes(num_classes)
        width = check_positive_int("width", width)
        self.input_shape: tuple[int, ...] = shape
        self.num_classes: int = num_classes
        self.width: int = width

        self.unflatten: nn.Module = (
            nn.Identity() if len(shape) == 3 else nn.Unflatten(1, (channels, height, wide))
        )
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, 1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        in_channels = width
        for i, stride in enumerate((1, 2, 2, 2)):
            out_channels = width * 2**i
            stages.append(
                nn.Sequential(
                    BasicBlock(in_channels, out_channels, stride),
                    BasicBlock(out_channels, out_channels, 1),
                )
            )
            in_channels = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_residual_network(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(B, num_classes)`` for a batch ``x`` of shape ``(B, *input_shape)``."""
        x = self.stem(self.unflatten(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))
