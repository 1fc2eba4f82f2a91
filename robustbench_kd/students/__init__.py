"""Built-in student architectures and :func:`build_student`.

Every model here follows the RobustBench/AutoAttack convention: it takes images in [0, 1] of shape
(N, C, H, W) and returns logits (N, num_classes); any input normalisation happens inside
``forward`` (see the ``normalize`` option). State-dict keys never contain ``"model."`` or
``"module."``, which ``robustbench.utils.load_model`` would rewrite.

May import the layers below it: ``scale``, ``zoo`` (RobustBench's own architectures, through its import
shim), ``data``, the core plugin API, ``storage`` and ``errors``; never ``methods`` (an independent sibling)
or anything that trains or evaluates.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robustbench_kd.errors import UserError, close_matches
from robustbench_kd.students.mobilenetv2 import MobileNetV2, build_mobilenetv2
from robustbench_kd.students.small_cnn import SmallCNN, build_small_cnn
from robustbench_kd.students.zoo_architectures import (
    build_preact_resnet18,
    build_resnet18,
    build_wrn_28_10,
    build_wrn_34_10,
)

__all__ = [
    "BUILTIN_STUDENTS",
    "COMMON_OPTIONS",
    "MobileNetV2",
    "Normalized",
    "SmallCNN",
    "StudentSpec",
    "build_student",
    "student_options",
]

#: Parameters every factory receives; everything else in its signature is a per-student option.
_DATA_PARAMETERS = ("num_classes", "in_channels", "image_size")
#: Options :func:`build_student` handles itself for every student.
COMMON_OPTIONS = ("normalize",)


@dataclass(frozen=True)
class StudentSpec:
    """A named student architecture.

    ``factory`` is called as ``factory(*, num_classes, in_channels, image_size, **options)`` and
    returns an ``nn.Module`` mapping [0, 1] images to logits. Its keyword-only parameters beyond
    those three are the student's options.
    """

    name: str
    factory: Callable[..., nn.Module]
    description: str


BUILTIN_STUDENTS: dict[str, StudentSpec] = {
    spec.name: spec
    for spec in (
        StudentSpec(
            "small-cnn",
            build_small_cnn,
            "3 conv layers (32-32-64, BN+ReLU), max-pool, 128-wide fc, global average pool, fc; "
            "any in_channels and image size; option width (channel multiplier, default 1.0)",
        ),
        StudentSpec("resnet18", build_resnet18, "RobustBench CIFAR ResNet-18 (3x32x32 inputs)"),
        StudentSpec("preact-resnet18", build_preact_resnet18, "RobustBench CIFAR PreAct ResNet-18 (3x32x32 inputs)"),
        StudentSpec("wrn-34-10", build_wrn_34_10, "RobustBench WideResNet-34-10 (3x32x32 inputs)"),
        StudentSpec("wrn-28-10", build_wrn_28_10, "RobustBench WideResNet-28-10 (3x32x32 inputs)"),
        StudentSpec(
            "mobilenetv2",
            build_mobilenetv2,
            "CIFAR MobileNetV2 as in ARD/RSLAD (stride-1 stem, total stride 8; 3-channel inputs); "
            "option width (channel multiplier, default 1.0)",
        ),
    )
}


class Normalized(nn.Module):
    """Wrap ``net`` so that ``forward(x) = net((x - mean) / std)`` per channel.

    ``mean`` and ``std`` are saved as (persistent) buffers of shape (1, C, 1, 1), so a checkpoint
    carries the normalisation the weights were trained with. The wrapped network is the attribute
    ``net`` (its state-dict keys are ``net.<...>``; ``model``/``module`` would be mangled by
    RobustBench's loader).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise [0, 1] images and return ``net``'s logits."""
        return self.net((x - self.mean) / self.std)


def student_options(name: str) -> tuple[str, ...]:
    """The option names :func:`build_student` accepts for the built-in student ``name``, sorted."""
    return tuple(sorted(set(_factory_options(_lookup(name).factory) or ()) | set(COMMON_OPTIONS)))


def build_student(name: str, *, num_classes: int, in_channels: int, image_size: int, **options: Any) -> nn.Module:
    """Build the built-in student ``name`` for data of shape (in_channels, image_size, image_size).

    ``options`` are the student's own options (e.g. ``width``) plus ``normalize``: ``None`` (the
    default) or a ``(mean, std)`` pair, each a number or one number per input channel, which wraps
    the network in :class:`Normalized`. Raises :class:`~robustbench_kd.errors.UserError` for an
    unknown name (listing the valid ones), an unknown option (listing the valid ones), invalid
    option values, or data shapes the architecture cannot take.
    """
    spec = _lookup(name)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{key} must be a positive integer, got {value!r}")
    normalize = options.pop("normalize", None)
    accepted = _factory_options(spec.factory)
    if accepted is not None:
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            valid = ", ".join(sorted(set(accepted) | set(COMMON_OPTIONS)))
            raise UserError(
                f"unknown option {unknown[0]!r} for student {spec.name!r}"
                f"{close_matches(unknown[0], [*accepted, *COMMON_OPTIONS])}; valid options: {valid}"
            )
    net = spec.factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **options)
    if normalize is None:
        return net
    mean, std = _normalization(normalize, in_channels)
    return Normalized(net, mean, std)


def _lookup(name: str) -> StudentSpec:
    spec = BUILTIN_STUDENTS.get(name) if isinstance(name, str) else None
    if spec is None and isinstance(name, str):
        # Be lenient about case and underscores ("WRN_34_10"); the canonical names are lower-case with dashes.
        spec = BUILTIN_STUDENTS.get(name.strip().lower().replace("_", "-"))
    if spec is None:
        raise UserError(
            f"unknown student {name!r}{close_matches(str(name), BUILTIN_STUDENTS)}; "
            f"valid students: {', '.join(BUILTIN_STUDENTS)}"
        )
    return spec


def _factory_options(factory: Callable[..., nn.Module]) -> tuple[str, ...] | None:
    """Keyword options of ``factory`` beyond the data parameters; ``None`` if it takes ``**kwargs``."""
    parameters = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return tuple(
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and p.name not in _DATA_PARAMETERS
    )


def _normalization(normalize: Any, in_channels: int) -> tuple[list[float], list[float]]:
    """Validate ``normalize=(mean, std)`` and expand scalars to one value per channel."""
    if not isinstance(normalize, Sequence) or isinstance(normalize, str) or len(normalize) != 2:
        raise UserError(f"normalize must be None or a (mean, std) pair, got {normalize!r}")
    expanded: list[list[float]] = []
    for label, value in zip(("mean", "std"), normalize, strict=False):
        values = [value] if isinstance(value, (int, float)) else value
        try:
            floats = [float(v) for v in values]
        except (TypeError, ValueError):
            raise UserError(f"normalize {label} must be a number or a sequence of numbers, got {value!r}") from None
        if len(floats) == 1:
            floats *= in_channels
        if len(floats) != in_channels:
            raise UserError(f"normalize {label} has {len(floats)} values but the data has {in_channels} channels")
        if not all(math.isfinite(v) for v in floats):
            raise UserError(f"normalize {label} must be finite, got {value!r}")
        expanded.append(floats)
    mean, std = expanded
    if not all(s > 0 for s in std):
        raise UserError(f"normalize std must be positive, got {normalize[1]!r}")
    return mean, std
