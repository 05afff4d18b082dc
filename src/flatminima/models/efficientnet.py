"""EfficientNet-B0 (Tan & Le, 2019) with MBConv blocks, squeeze-excitation and stochastic depth."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import nn

from ._validation import check_dropout, check_input_shape, check_num_classes, image_shape

__all__ = ["B0_STAGES", "DropPath", "EfficientNetB0", "MBConv", "SqueezeExcitation"]

#: The B0 stages as ``(expand_ratio, kernel, stride, out_channels, num_blocks)``.
B0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_STEM_CHANNELS = 32
_HEAD_FACTOR = 4  # head channels = 4 x the last stage's channels (1280 for B0)
_SE_RATIO = 0.25  # squeeze channels = block input channels / 4
_LARGE_IMAGE = 128  # smaller side from which the stem keeps the reference stride 2


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of ``divisor`` (at least ``divisor``), never
    below 90% of ``value`` (the reference rounding of the width multiplier).

    Example:
        >>> make_divisible(32 * 0.5), make_divisible(40 * 1.1), make_divisible(3.0)
        (16, 48, 8)
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn(
    c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """``SiLU(BN(conv_kxk(x)))`` with "same" padding and no conv bias (``act=False``: no SiLU)."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class DropPath(nn.Module):
    r"""Stochastic depth on a residual branch (Huang et al., 2016), per sample.

    In training mode ``y_b = x_b * m_b / (1 - p)`` with ``m_b ~ Bernoulli(1 - p)`` drawn once per
    sample ``b`` (a whole sample's branch is dropped or kept), so ``E[y] = x``; in eval mode, or
    with ``p = 0``, ``y = x``.

    Args:
        p: drop probability in ``[0, 1)``.

    Raises:
        ValueError: if ``p`` is not in ``[0, 1)``.

    Example:
        >>> import torch
        >>> drop = DropPath(0.5).eval()
        >>> torch.equal(drop(torch.ones(4, 3)), torch.ones(4, 3))
        True
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, Real) or not 0.0 <= float(p) < 1.0:
            raise ValueError(f"Invalid drop-path probability: {p!r}; expected a value in [0, 1)")
        self.p: float = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x * mask.bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SqueezeExcitation(nn.Module):
    r"""Channel gating of Hu et al. (2018):
    ``y = x * sigmoid(W_2 SiLU(W_1 avgpool(x) + b_1) + b_2)`` with ``W_1: channels -> squeeze``
    and ``W_2: squeeze -> channels`` (1x1 convolutions with bias).

    Args:
        channels: channels of ``x`` (the expanded channels inside an MBConv block).
        squeeze: bottleneck width (EfficientNet: the block's *input* channels / 4).
    """

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(self.pool(x)))))


class MBConv(nn.Module):
    r"""Mobile inverted bottleneck block with squeeze-excitation (Sandler et al. 2018; Tan & Le
    2019).

    ``h = SiLU(BN(conv1x1(x)))`` expands ``c_in -> e * c_in`` channels (skipped when ``e = 1``),
    ``h = SiLU(BN(dwconv_kxk_s(h)))`` is depthwise, ``h = SE(h)`` with ``max(1, c_in / 4)``
    squeeze channels, ``h = BN(conv1x1(h))`` projects to ``c_out`` (no activation). With
    ``s = 1`` and ``c_in = c_out`` the block is residual: ``y = x + DropPath_p(h)``; else ``y = h``.

    Args:
        c_in: input channels.
        c_out: output channels.
        kernel: depthwise kernel size (3 or 5 in B0).
        stride: depthwise stride.
        expand_ratio: expansion factor ``e``.
        drop_path: stochastic-depth probability ``p`` of the residual branch.
    """

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, expand_ratio: int, drop_path: float
    ) -> None:
        super().__init__()
        hidden = make_divisible(c_in * expand_ratio)
        layers: list[nn.Module] = []
        if hidden != c_in:
            layers.append(_conv_bn(c_in, hidden, 1))
        layers += [
            _conv_bn(hidden, hidden, kernel, stride, groups=hidden),
            SqueezeExcitation(hidden, max(1, int(c_in * _SE_RATIO))),
            _conv_bn(hidden, c_out, 1, act=False),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out
        self.drop_path = DropPath(drop_path) if self.residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + self.drop_path(out) if self.residual else out


def _check_multiplier(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < float(value) <= 16.0:
        raise ValueError(f"Invalid {name}: {value!r}; expected a number in (0, 16]")
    return float(value)


def _check_stem_stride(stem_stride: object, height: int, width: int) -> int:
    if stem_stride is None:
        return 2 if min(height, width) >= _LARGE_IMAGE else 1
    if stem_stride not in (1, 2) or isinstance(stem_stride, bool):
        raise ValueError(f"Invalid stem_stride: {stem_stride!r}; expected 1, 2 or None (auto)")
    return int(stem_stride)


def _build_stages(
    stem: int, width_mult: float, depth_mult: float, drop_path: float
) -> tuple[nn.Sequential, int]:
    """The MBConv stages; block ``i`` of ``n`` (counted over all stages) has drop-path rate
    ``drop_path * i / n``. Returns the stages and their output channels."""
    depths = [int(math.ceil(n * depth_mult)) for *_, n in B0_STAGES]
    total, index, c_in = sum(depths), 0, stem
    stages: list[nn.Module] = []
    for (expand, kernel, stride, channels, _), depth in zip(B0_STAGES, depths):
        c_out = make_divisible(channels * width_mult)
        blocks = []
        for j in range(depth):
            rate = drop_path * index / total
            blocks.append(MBConv(c_in, c_out, kernel, stride if j == 0 else 1, expand, rate))
            c_in, index = c_out, index + 1
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(*stages), c_in


class EfficientNetB0(nn.Module):
    r"""EfficientNet-B0 (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional
    Neural Networks", ICML 2019), the layer structure of the reference and torchvision models.

    Stem ``SiLU(BN(conv3x3_s(x)))`` with 32 channels, seven stages of :class:`MBConv` blocks
    (:data:`B0_STAGES`: expansion, kernel, stride, channels, blocks), head
    ``SiLU(BN(conv1x1(h)))`` with ``4 x 320 = 1280`` channels, global average pooling, dropout
    and a linear classifier. At ``(3, 224, 224)`` with 1000 classes it has the published
    5,288,548 parameters. Channels scale as ``make_divisible(c * width_mult)`` and block counts
    as ``ceil(n * depth_mult)``; stochastic depth grows linearly from 0 to ``drop_path`` over the
    blocks (``drop_path * i / n`` for block ``i`` of ``n``).

    The stem stride ``s`` is the only change between sizes: ``s = 2`` (the reference, total
    downsampling 32) for images whose smaller side is at least 128 pixels, ``s = 1`` (total
    downsampling 16: 32 -> 2x2 for CIFAR, 28 -> 2x2 for Fashion-MNIST) below, unless
    ``stem_stride`` is given. The input channel count is ``C`` of ``input_shape``; ``(H, W)`` and a
    flat ``(D,)`` with ``D`` a perfect square are read as one-channel images.

    Initialisation (as the reference): convolutions Kaiming-normal (fan-out), zero biases,
    BatchNorm weight 1 and bias 0, the classifier ``U(-1/sqrt(K), 1/sqrt(K))`` for ``K``
    classes with zero bias. BatchNorm keeps PyTorch's defaults (eps 1e-5, momentum 0.1), as in
    torchvision. Works with ``torch.func.functional_call`` and ``vmap`` in eval mode.

    Args:
        input_shape: one example's shape without the batch dimension, e.g. ``(3, 32, 32)``.
        num_classes: number of output logits.
        width_mult: channel multiplier (1.0 for B0).
        depth_mult: block-count multiplier (1.0 for B0).
        dropout: dropout probability before the classifier (0.2 for B0).
        drop_path: largest stochastic-depth probability (0.2 for B0).
        stem_stride: 1, 2, or ``None`` to choose from the image size as above.

    Raises:
        ValueError: on an invalid shape, class count, multiplier, probability or stride.

    Example:
        >>> import torch
        >>> model = EfficientNetB0((1, 28, 28), 10, width_mult=0.25, depth_mult=0.25)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> sum(p.numel() for p in EfficientNetB0((3, 224, 224), 1000).parameters())
        5288548
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        dropout: float = 0.2,
        drop_path: float = 0.2,
        stem_stride: int | None = None,
    ) -> None:
        super().__init__()
        shape = check_input_shape(input_shape)
        channels, height, wide = image_shape(shape, "efficientnet_b0")
        self.input_shape: tuple[int, ...] = shape
        self.num_classes: int = check_num_classes(num_classes)
        width_mult = _check_multiplier("width_mult", width_mult)
        depth_mult = _check_multiplier("depth_mult", depth_mult)
        DropPath(drop_path)  # validates drop_path with its error message
        self.stem_stride: int = _check_stem_stride(stem_stride, height, wide)

        self.unflatten: nn.Module = (
            nn.Identity() if len(shape) == 3 else nn.Unflatten(1, (channels, height, wide))
        )
        stem = make_divisible(_STEM_CHANNELS * width_mult)
        self.stem = _conv_bn(channels, stem, 3, self.stem_stride)
        self.stages, last = _build_stages(stem, width_mult, depth_mult, float(drop_path))
        self.head = _conv_bn(last, _HEAD_FACTOR * last, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(check_dropout(dropout))
        self.classifier = nn.Linear(_HEAD_FACTOR * last, self.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        bound = 1.0 / math.sqrt(self.num_classes)
        nn.init.uniform_(self.classifier.weight, -bound, bound)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(B, num_classes)`` for a batch ``x`` of shape ``(B, *input_shape)``."""
        x = self.head(self.stages(self.stem(self.unflatten(x))))
        return self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))
