"""A small CNN for the embedded 8x8 grayscale digits data and for fast tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustbench_kd.errors import UserError

#: Channel widths at ``width=1.0``: three 3x3 conv layers and the 128-wide hidden "fc" layer.
BASE_CHANNELS = (32, 32, 64)
BASE_HIDDEN = 128


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class SmallCNN(nn.Module):
    """conv-BN-ReLU x2, 2x2 max-pool, conv-BN-ReLU, fc 128 + ReLU, global average pool, fc ``num_classes``.

    The 128-wide hidden fully-connected layer is a 1x1 convolution applied at every spatial position
    *before* global average pooling (a per-position fully-connected layer), so the input of the final
    ``nn.Linear`` is exactly the spatial mean of the ``features`` output. That keeps the network
    usable with class-activation-map methods (see :mod:`robustbench_kd.methods.features`), which a
    flatten-then-fc head would not be. Works for any ``in_channels`` and any ``image_size >= 2``.
    """

    def __init__(self, *, num_classes: int, in_channels: int, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3 = (_scaled(c, width) for c in BASE_CHANNELS)
        hidden = _scaled(BASE_HIDDEN, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c3),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, hidden, kernel_size=1, bias=True),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map images in [0, 1] of shape (N, in_channels, H, W) to logits (N, num_classes)."""
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build_small_cnn(*, num_classes: int, in_channels: int, image_size: int, width: float = 1.0) -> nn.Module:
    """Build :class:`SmallCNN`; ``width`` multiplies every channel count (e.g. 2.0 for a wider teacher)."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise UserError(f"small-cnn option width must be a positive number, got {width!r}")
    if image_size < 2:
        raise UserError(f"small-cnn needs image_size >= 2 (it has one 2x2 max-pool), got {image_size}")
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, width=float(width))
