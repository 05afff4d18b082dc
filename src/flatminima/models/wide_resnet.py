"""Wide residual network WRN-d-k with pre-activation blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._init import init_residual_network
from ._validation import (
    check_dropout,
    check_input_shape,
    check_num_classes,
    check_positive_int,
    image_shape,
)

__all__ = ["WideBasicBlock", "WideResNet"]


class WideBasicBlock(nn.Module):
    r"""Pre-activation wide block ``B(3,3)`` of Zagoruyko & Komodakis (2016).

    With ``a = relu(BN_1(x))``:
    ``y = conv3x3(drop(relu(BN_2(conv3x3_s(a))))) + shortcut``, where the shortcut is ``x``
    itself when the channel count is unchanged and ``conv1x1_s(a)`` otherwise, as in the
    authors' reference code.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution and of the projection shortcut.
        dropout: dropout probability between the two convolutions.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No in-place ops: keeps the block usable under torch.func transforms.
        a = torch.relu(self.bn1(x))
        out = self.conv1(a)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    r"""Wide residual network WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis, "Wide
    Residual Networks", BMVC 2016).

    With ``k = widen_factor`` and ``n = (depth - 4) / 6`` blocks per group: ``conv3x3`` to 16
    channels, three groups of ``n`` :class:`WideBasicBlock` with ``16k, 32k, 64k`` channels and
    strides ``1, 2, 2``, then ``relu(BN(.))``, global average pooling and a linear layer.
    WRN-28-10 has 36,479,194 parameters for 10 classes; WRN-16-4 about 2.7M.

    Initialisation: convolutions Kaiming-normal (fan-out, ReLU gain), BatchNorm weight 1 and
    bias 0, the linear layer PyTorch's default. Inputs may be ``(C, H, W)``, ``(H, W)`` or flat
    ``(D,)`` with ``D`` a perfect square. Works with ``torch.func.functional_call`` and ``vmap``
    with BatchNorm in eval mode (dropout in train mode needs ``randomness="different"``).

    Args:
        input_shape: shape of one example without the batch dimension, e.g. ``(3, 32, 32)``.
        num_classes: number of output logits.
        depth: total depth ``d``; ``(d - 4) % 6 == 0`` and ``d >= 10``.
        widen_factor: width multiplier ``k``.
        dropout: dropout probability inside each block, in ``[0, 1)`` (the paper uses 0.3).

    Raises:
        ValueError: if ``(depth - 4) % 6 != 0`` or on any other invalid argument.

    Example:
        >>> import torch
        >>> model = WideResNet((3, 32, 32), 10, depth=10, widen_factor=1)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        shape = check_input_shape(input_shape)
        channels, height, wide = image_shape(shape, "wrn")
        num_classes = check_num_classes(num_classes)
        depth = check_positive_int("depth", depth)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"Invalid depth: {depth!r}; WideResNet needs (depth - 4) % 6 == 0 and "
                "depth >= 10, e.g. 10, 16, 22, 28, 34, 40"
            )
        widen_factor = check_positive_int("widen_factor", widen_factor)
        dropout = check_dropout(dropout)
        self.input_shape: tuple[int, ...] = shape
        self.num_classes: int = num_classes
        self.depth: int = depth
        self.widen_factor: int = widen_factor

        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.unflatten: nn.Module = (
            nn.Identity() if len(shape) == 3 else nn.Unflatten(1, (channels, height, wide))
        )
        self.conv = nn.Conv2d(channels, widths[0], 3, 1, padding=1, bias=False)
        groups: list[nn.Module] = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = [WideBasicBlock(widths[i], widths[i + 1], stride, dropout)]
            blocks += [
                WideBasicBlock(widths[i + 1], widths[i + 1], 1, dropout) for _ in range(n - 1)
            ]
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_residual_network(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(B, num_classes)`` for a batch ``x`` of shape ``(B, *input_shape)``."""
        x = self.conv(self.unflatten(x))
        x = self.block3(self.block2(self.block1(x)))
        x = torch.relu(self.bn(x))
        return self.fc(torch.flatten(self.pool(x), 1))
