"""Students built from RobustBench's own CIFAR architecture classes.

Using RobustBench's classes (rather than look-alikes) means a student has exactly the layout, layer
names and initialisation of the corresponding model-zoo entries. ``robustbench`` is imported lazily
inside the factories, after :func:`robustbench_kd.zoo.compat.install`, because robustbench 1.1.1 does
not import on its own.

These classes hard-code three input channels and a fixed final pooling kernel
(``F.avg_pool2d(out, 4)`` or ``(out, 8)``) sized for 32x32 inputs, so the factories refuse any
other ``in_channels`` or ``image_size`` instead of failing later with a shape error.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import nn

from robustbench_kd.errors import UserError

CIFAR_IMAGE_SIZE = 32


def robustbench_architecture_module(name: str) -> ModuleType:
    """Import ``robustbench.model_zoo.architectures.<name>`` after installing the compatibility shims."""
    from robustbench_kd.zoo import compat

    # import_robustbench() runs compat.install() first and silences robustbench's import-time noise.
    compat.import_robustbench()
    return importlib.import_module(f"robustbench.model_zoo.architectures.{name}")


def check_cifar_input(student: str, *, in_channels: int, image_size: int) -> None:
    """Raise :class:`UserError` unless the data is 3-channel 32x32, which ``student`` requires."""
    if in_channels != 3:
        raise UserError(
            f"{student} is a CIFAR architecture and needs in_channels == 3, got {in_channels}; "
            "use small-cnn for grayscale or other channel counts"
        )
    if image_size != CIFAR_IMAGE_SIZE:
        raise UserError(
            f"{student} is RobustBench's CIFAR architecture, whose forward hard-codes its final pooling "
            f"for {CIFAR_IMAGE_SIZE}x{CIFAR_IMAGE_SIZE} inputs, got image_size={image_size}; "
            "use small-cnn or mobilenetv2 for other sizes"
        )


def build_resnet18(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """RobustBench's CIFAR ResNet-18 (``resnet.ResNet(BasicBlock, [2, 2, 2, 2], num_classes)``)."""
    check_cifar_input("resnet18", in_channels=in_channels, image_size=image_size)
    arch = robustbench_architecture_module("resnet")
    # resnet.ResNet18() takes no num_classes, so build the class directly with ResNet18's layout.
    return arch.ResNet(arch.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


def build_preact_resnet18(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """RobustBench's CIFAR PreAct ResNet-18 (``resnet.PreActResNet(PreActBlock, [2, 2, 2, 2], num_classes)``)."""
    check_cifar_input("preact-resnet18", in_channels=in_channels, image_size=image_size)
    arch = robustbench_architecture_module("resnet")
    # resnet.PreActResNet18() takes no num_classes either.
    return arch.PreActResNet(arch.PreActBlock, [2, 2, 2, 2], num_classes=num_classes)


def build_wide_resnet(
    *, depth: int, widen_factor: int, num_classes: int, in_channels: int, image_size: int
) -> nn.Module:
    """RobustBench's CIFAR WideResNet-``depth``-``widen_factor`` (``wide_resnet.WideResNet``)."""
    check_cifar_input(f"wrn-{depth}-{widen_factor}", in_channels=in_channels, image_size=image_size)
    arch = robustbench_architecture_module("wide_resnet")
    return arch.WideResNet(depth=depth, num_classes=num_classes, widen_factor=widen_factor)


def build_wrn_34_10(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """RobustBench's WideResNet-34-10, the usual TRADES/ARD/RSLAD teacher and student."""
    return build_wide_resnet(
        depth=34, widen_factor=10, num_classes=num_classes, in_channels=in_channels, image_size=image_size
    )


def build_wrn_28_10(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """RobustBench's WideResNet-28-10."""
    return build_wide_resnet(
        depth=28, widen_factor=10, num_classes=num_classes, in_channels=in_channels, image_size=image_size
    )
