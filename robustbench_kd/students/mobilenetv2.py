"""MobileNetV2 for 32x32 inputs, laid out like the CIFAR variant used by the ARD and RSLAD code.

Differences from the ImageNet network (Sandler et al., 2018), all to avoid shrinking a 32x32 image
to 1x1: the stem convolution has stride 1 instead of 2, and the first inverted-residual stage that
downsamples (the 24-channel one) has stride 1 instead of 2. The total stride is therefore 8 and a
32x32 input reaches the head as a 4x4 map. Like the ARD/RSLAD code the blocks use ReLU, always have
the 1x1 expansion convolution (also for expansion factor 1), and stride-1 blocks that change the
channel count add a 1x1 conv + BN projection shortcut. Global average pooling replaces the fixed
``avg_pool2d(out, 4)``, so other image sizes work too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustbench_kd.errors import UserError

#: (expansion factor t, output channels c, repeats n, stride s of the first repeat), CIFAR strides.
CIFAR_CONFIG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 in the ImageNet network
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never dropping more than 10% below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _conv_bn(
    in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expansion -> 3x3 depthwise (carries the stride) -> linear 1x1 projection, plus a shortcut.

    Stride-1 blocks add a shortcut (identity if the channel count is unchanged, else 1x1 conv + BN);
    stride-2 blocks have none.
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.expand = _conv_bn(in_ch, hidden, 1)
        self.depthwise = _conv_bn(hidden, hidden, 3, stride=stride, groups=hidden)
        self.project = _conv_bn(hidden, out_ch, 1, relu=False)
        self.use_shortcut = stride == 1
        self.shortcut: nn.Module = (
            _conv_bn(in_ch, out_ch, 1, relu=False) if stride == 1 and in_ch != out_ch else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + self.shortcut(x) if self.use_shortcut else out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 (see the module docstring); ``width`` scales every layer's channels."""

    def __init__(self, *, num_classes: int, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        stem = make_divisible(STEM_CHANNELS * width)
        self.stem = _conv_bn(in_channels, stem, 3)
        blocks: list[nn.Module] = []
        in_ch = stem
        for expansion, channels, repeats, stride in CIFAR_CONFIG:
            out_ch = make_divisible(channels * width)
            for i in range(repeats):
                blocks.append(InvertedResidual(in_ch, out_ch, stride=stride if i == 0 else 1, expansion=expansion))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        # As in the reference network the head is only ever widened, never narrowed.
        head = make_divisible(HEAD_CHANNELS * max(1.0, width))
        self.head = _conv_bn(in_ch, head, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map images in [0, 1] of shape (N, C, H, W) to logits (N, num_classes)."""
        out = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(out), 1))


def build_mobilenetv2(*, num_classes: int, in_channels: int, image_size: int, width: float = 1.0) -> nn.Module:
    """Build the CIFAR :class:`MobileNetV2`; needs ``in_channels == 3`` and ``image_size >= 8``."""
    if in_channels != 3:
        raise UserError(
            f"mobilenetv2 is a CIFAR architecture and needs in_channels == 3, got {in_channels}; "
            "use small-cnn for grayscale or other channel counts"
        )
    if image_size < 8:
        raise UserError(f"mobilenetv2 downsamples by 8 and needs image_size >= 8, got {image_size}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise UserError(f"mobilenetv2 option width must be a positive number, got {width!r}")
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, width=float(width))
