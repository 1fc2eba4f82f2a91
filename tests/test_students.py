"""Built-in students: shapes, state-dict keys, options and errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from robustbench_kd.errors import UserError
from robustbench_kd.students import (
    BUILTIN_STUDENTS,
    MobileNetV2,
    Normalized,
    SmallCNN,
    StudentSpec,
    build_student,
    student_options,
)

FORBIDDEN = ("model.", "module.")
# (name, in_channels, image_size, built on the meta device because a real build is slow on CPU)
DATA_SHAPES = [
    ("small-cnn", 1, 8, False),
    ("small-cnn", 3, 32, False),
    ("mobilenetv2", 3, 32, False),
    ("resnet18", 3, 32, False),
    ("preact-resnet18", 3, 32, False),
    ("wrn-34-10", 3, 32, True),
    ("wrn-28-10", 3, 32, True),
]


def _build(name: str, in_channels: int, image_size: int, meta: bool, **options: object) -> nn.Module:
    if meta:
        with torch.device("meta"):
            return build_student(name, num_classes=7, in_channels=in_channels, image_size=image_size, **options)
    return build_student(name, num_classes=7, in_channels=in_channels, image_size=image_size, **options)


def test_registry_lists_every_builtin() -> None:
    assert set(BUILTIN_STUDENTS) == {
        "small-cnn",
        "resnet18",
        "preact-resnet18",
        "wrn-34-10",
        "wrn-28-10",
        "mobilenetv2",
    }
    for key, spec in BUILTIN_STUDENTS.items():
        assert isinstance(spec, StudentSpec) and spec.name == key and spec.description
    with pytest.raises(dataclasses.FrozenInstanceError):
        BUILTIN_STUDENTS["small-cnn"].name = "x"  # type: ignore[misc]


@pytest.mark.parametrize(("name", "in_channels", "image_size", "meta"), DATA_SHAPES)
def test_builtin_output_shape_and_state_dict_keys(name: str, in_channels: int, image_size: int, meta: bool) -> None:
    torch.manual_seed(0)
    model = _build(name, in_channels, image_size, meta).eval()
    x = torch.rand(2, in_channels, image_size, image_size, device="meta" if meta else "cpu")
    with torch.no_grad():
        assert model(x).shape == (2, 7)
    for key in model.state_dict():
        assert not any(bad in key for bad in FORBIDDEN), key


@pytest.mark.parametrize(("name", "in_channels", "image_size", "meta"), DATA_SHAPES)
def test_normalize_wraps_without_forbidden_keys(name: str, in_channels: int, image_size: int, meta: bool) -> None:
    model = _build(name, in_channels, image_size, meta, normalize=(0.5, 0.25))
    assert isinstance(model, Normalized)
    keys = list(model.state_dict())
    assert "mean" in keys and "std" in keys and any(k.startswith("net.") for k in keys)
    for key in keys:
        assert not any(bad in key for bad in FORBIDDEN), key


def test_normalize_happens_inside_forward() -> None:
    torch.manual_seed(0)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model = build_student("small-cnn", num_classes=5, in_channels=3, image_size=8, normalize=(mean, std)).eval()
    x = torch.rand(3, 3, 8, 8)
    expected = model.net((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize(
    ("normalize", "message"),
    [
        ((0.5,), "(mean, std) pair"),
        (((0.5, 0.5), 0.2), "2 values but the data has 3 channels"),
        ((0.5, 0.0), "positive"),
    ],
)
def test_normalize_validation(normalize: object, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_student("small-cnn", num_classes=5, in_channels=3, image_size=8, normalize=normalize)


def test_robustbench_classes_are_used() -> None:
    from robustbench_kd.zoo import compat

    compat.import_robustbench()
    from robustbench.model_zoo.architectures.resnet import PreActResNet, ResNet
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    with torch.device("meta"):
        wrn = build_student("wrn-34-10", num_classes=100, in_channels=3, image_size=32)
    assert isinstance(wrn, WideResNet) and wrn.fc.out_features == 100 and wrn.nChannels == 640
    assert len(wrn.block1.layer) == 5  # (34 - 4) / 6 blocks per group
    assert isinstance(build_student("resnet18", num_classes=3, in_channels=3, image_size=32), ResNet)
    assert isinstance(build_student("preact-resnet18", num_classes=3, in_channels=3, image_size=32), PreActResNet)


@pytest.mark.parametrize("image_size", [8, 9, 13, 28, 32])
@pytest.mark.parametrize("in_channels", [1, 2, 3])
def test_small_cnn_any_image_size_and_channels(image_size: int, in_channels: int) -> None:
    model = build_student("small-cnn", num_classes=10, in_channels=in_channels, image_size=image_size).eval()
    assert isinstance(model, SmallCNN)
    with torch.no_grad():
        assert model(torch.rand(2, in_channels, image_size, image_size)).shape == (2, 10)


def test_small_cnn_width_makes_a_wider_teacher() -> None:
    student = build_student("small-cnn", num_classes=10, in_channels=1, image_size=8)
    teacher = build_student("small-cnn", num_classes=10, in_channels=1, image_size=8, width=2.0)
    convs = [m.out_channels for m in student.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [32, 32, 64, 128]
    assert [m.out_channels for m in teacher.modules() if isinstance(m, nn.Conv2d)] == [64, 64, 128, 256]
    assert sum(p.numel() for p in teacher.parameters()) > 3 * sum(p.numel() for p in student.parameters())
    with pytest.raises(UserError, match="width"):
        build_student("small-cnn", num_classes=10, in_channels=1, image_size=8, width=0)


def test_mobilenetv2_matches_the_ard_rslad_layout() -> None:
    with torch.device("meta"):  # shapes and counts only; depthwise convs are slow on a busy CPU
        model = build_student("mobilenetv2", num_classes=10, in_channels=3, image_size=32)
        head = model.head(model.blocks(model.stem(torch.empty(1, 3, 32, 32))))
        narrow = build_student("mobilenetv2", num_classes=10, in_channels=3, image_size=32, width=0.5)
    assert isinstance(model, MobileNetV2)
    # Parameter count of the CIFAR MobileNetV2 in the ARD/RSLAD code at width 1.
    assert sum(p.numel() for p in model.parameters()) == 2_296_922
    assert head.shape == (1, 1280, 4, 4)  # total stride 8
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in model.parameters())


def test_unknown_student_lists_valid_names() -> None:
    with pytest.raises(UserError, match="did you mean: wrn-34-10") as info:
        build_student("wrn-34-11", num_classes=10, in_channels=3, image_size=32)
    for name in BUILTIN_STUDENTS:
        assert name in str(info.value)


def test_name_is_case_and_underscore_tolerant() -> None:
    assert isinstance(build_student("Small_CNN", num_classes=2, in_channels=1, image_size=8), SmallCNN)


def test_unknown_option_names_valid_options() -> None:
    with pytest.raises(
        UserError, match=r"unknown option 'widht'.*did you mean: width.*valid options: normalize, width"
    ):
        build_student("small-cnn", num_classes=10, in_channels=1, image_size=8, widht=2.0)
    with pytest.raises(UserError, match=r"valid options: normalize$"):
        build_student("resnet18", num_classes=10, in_channels=3, image_size=32, width=2.0)
    assert student_options("mobilenetv2") == ("normalize", "width")
    assert student_options("wrn-28-10") == ("normalize",)


@pytest.mark.parametrize("name", ["resnet18", "preact-resnet18", "wrn-34-10", "wrn-28-10", "mobilenetv2"])
def test_cifar_architectures_need_three_channels(name: str) -> None:
    with pytest.raises(ValueError, match="in_channels == 3"):
        build_student(name, num_classes=10, in_channels=1, image_size=32)


@pytest.mark.parametrize("name", ["resnet18", "preact-resnet18", "wrn-34-10"])
def test_robustbench_architectures_need_32x32(name: str) -> None:
    with pytest.raises(UserError, match="image_size=64"):
        build_student(name, num_classes=10, in_channels=3, image_size=64)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_data_parameters_are_validated(bad: object) -> None:
    with pytest.raises(UserError, match="num_classes must be a positive integer"):
        build_student("small-cnn", num_classes=bad, in_channels=1, image_size=8)  # type: ignore[arg-type]
