"""FeatureTap, locate_feature_map and cam on our students and on RobustBench architectures."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustbench_kd.errors import UserError
from robustbench_kd.methods.features import FeatureMapLocation, FeatureTap, cam, final_linear, locate_feature_map
from robustbench_kd.students import build_student


def _arch(name: str) -> ModuleType:
    from robustbench_kd.students.zoo_architectures import robustbench_architecture_module

    return robustbench_architecture_module(name)


def _small_wrn() -> nn.Module:
    return _arch("wide_resnet").WideResNet(depth=10, widen_factor=2, num_classes=10)


def _resnet18() -> nn.Module:
    arch = _arch("resnet")
    return arch.ResNet(arch.BasicBlock, [2, 2, 2, 2], num_classes=10)


def _preact_resnet18() -> nn.Module:
    arch = _arch("resnet")
    return arch.PreActResNet(arch.PreActBlock, [2, 2, 2, 2], num_classes=10)


def _preact_bn_before_fc() -> nn.Module:
    arch = _arch("resnet")
    return arch.PreActResNet(arch.PreActBlock, [1, 1, 1, 1], num_classes=10, bn_before_fc=True)


def _dm_wrn() -> nn.Module:
    return _arch("dm_wide_resnet").DMWideResNet(num_classes=10, depth=10, width=1)


def _small_cnn() -> nn.Module:
    return build_student("small-cnn", num_classes=10, in_channels=1, image_size=8)


# (factory, input shape (C, H, W), expected location)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int], FeatureMapLocation]] = {
    "small-cnn": (_small_cnn, (1, 8, 8), FeatureMapLocation("features")),
    # the in-place ReLU after bn1: its output, not bn1's, is the map
    "WideResNet": (_small_wrn, (3, 32, 32), FeatureMapLocation("relu")),
    "ResNet18": (_resnet18, (3, 32, 32), FeatureMapLocation("layer4")),
    "PreActResNet18": (_preact_resnet18, (3, 32, 32), FeatureMapLocation("layer4")),
    # F.relu(self.bn(out)) is functional: the bn output plus a recorded ReLU
    "PreActResNet-bn_before_fc": (_preact_bn_before_fc, (3, 32, 32), FeatureMapLocation("bn", "relu")),
    "DMWideResNet": (_dm_wrn, (3, 32, 32), FeatureMapLocation("relu")),
}


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("key", list(MODELS))
def test_tap_finds_the_map_whose_mean_is_the_penultimate(key: str) -> None:
    factory, shape, expected = MODELS[key]
    torch.manual_seed(0)
    model = factory()
    x = torch.rand(2, *shape)
    before = _hook_count(model)
    with FeatureTap(model, penultimate=True, feature_map=True) as tap:
        logits = model(x)
    assert _hook_count(model) == before
    assert tap.feature_map_location == expected
    fmap, pen = tap.feature_map, tap.penultimate
    assert fmap.dim() == 4 and fmap.shape[:2] == pen.shape and fmap.shape[2] * fmap.shape[3] > 1
    torch.testing.assert_close(fmap.mean(dim=(2, 3)), pen, rtol=1e-5, atol=1e-5)
    _, fc = final_linear(model)
    assert tap.fc_weight is fc.weight
    torch.testing.assert_close(F.linear(pen, tap.fc_weight, tap.fc_bias), logits)


def test_wide_resnet_map_is_post_relu_and_matches_a_manual_forward() -> None:
    torch.manual_seed(0)
    model = _small_wrn().eval()
    x = torch.rand(2, 3, 32, 32)
    with FeatureTap(model, feature_map=True) as tap:
        model(x)
    with torch.no_grad():
        out = model.block3(model.block2(model.block1(model.conv1(x))))
        manual = torch.relu(model.bn1(out))
    assert (tap.feature_map >= 0).all()
    torch.testing.assert_close(tap.feature_map, manual)


def test_cam_of_wide_resnet_equals_manual_computation() -> None:
    torch.manual_seed(0)
    model = _small_wrn().eval()
    x = torch.rand(3, 3, 32, 32)
    labels = torch.tensor([0, 7, 3])
    with FeatureTap(model, feature_map=True) as tap:
        logits = model(x)
    maps = cam(tap.feature_map, tap.fc_weight, labels)
    fmap, weight = tap.feature_map.detach(), model.fc.weight.detach()
    manual = torch.einsum("nchw,nc->nhw", fmap, weight[labels])
    assert maps.shape == (3, 8, 8)
    torch.testing.assert_close(maps, manual)
    # an explicit loop over samples and channels, independent of einsum
    looped = torch.stack([sum(weight[labels[n], k] * fmap[n, k] for k in range(fmap.shape[1])) for n in range(3)])
    torch.testing.assert_close(maps, looped, rtol=1e-4, atol=1e-5)
    # the spatial mean of a CAM is the class logit minus the bias
    torch.testing.assert_close(maps.mean(dim=(1, 2)) + model.fc.bias[labels], logits.gather(1, labels[:, None])[:, 0])
    torch.testing.assert_close(tap.cam(labels), maps)
    # one int class for every sample
    torch.testing.assert_close(cam(tap.feature_map, tap.fc_weight, 7), torch.einsum("nchw,c->nhw", fmap, weight[7]))


@pytest.mark.parametrize("key", ["small-cnn", "WideResNet", "PreActResNet-bn_before_fc", "DMWideResNet"])
def test_gradient_reaches_the_input_through_the_map(key: str) -> None:
    factory, shape, _ = MODELS[key]
    torch.manual_seed(0)
    model = factory()
    x = torch.rand(2, *shape, requires_grad=True)
    with FeatureTap(model, penultimate=True, feature_map=True) as tap:
        model(x)
    assert tap.feature_map.requires_grad and tap.penultimate.requires_grad
    (grad,) = torch.autograd.grad(tap.cam(torch.tensor([1, 2])).square().sum(), x)
    assert grad.shape == x.shape and grad.abs().sum() > 0


def test_hooks_are_removed_when_the_block_raises() -> None:
    model = _small_cnn()
    before = _hook_count(model)
    with pytest.raises(KeyError):
        with FeatureTap(model, feature_map=True):
            assert _hook_count(model) > before
            raise KeyError("boom")
    assert _hook_count(model) == before


def test_location_is_cached_and_later_taps_hook_one_module() -> None:
    model = _small_wrn()
    assert locate_feature_map(model, torch.rand(2, 3, 32, 32)) == FeatureMapLocation("relu")
    before = _hook_count(model)
    with FeatureTap(model, penultimate=False, feature_map=True) as tap:
        assert tap.feature_map_location == FeatureMapLocation("relu")
        assert _hook_count(model) == before + 1
        model(torch.rand(2, 3, 32, 32))
    assert tap.feature_map.shape == (2, 128, 8, 8)  # 64 * widen_factor channels
    with pytest.raises(RuntimeError, match="not requested"):
        _ = tap.penultimate


def test_every_forward_inside_a_tap_overwrites_the_capture() -> None:
    model = _small_cnn().eval()
    x1, x2 = torch.rand(2, 1, 8, 8), torch.rand(3, 1, 8, 8)
    with FeatureTap(model, feature_map=True) as tap:
        model(x1)  # probe pass
        model(x2)  # pass with the single located hook
    assert tap.feature_map.shape[0] == 3 and tap.penultimate.shape[0] == 3
    torch.testing.assert_close(tap.feature_map.mean(dim=(2, 3)), tap.penultimate)


def test_locate_feature_map_leaves_training_state_alone() -> None:
    model = _small_cnn().train()
    model.features[1].eval()
    stats = model.features[1].running_mean.clone()
    locate_feature_map(model, torch.rand(4, 1, 8, 8))
    assert model.training and not model.features[1].training and model.features[4].training
    torch.testing.assert_close(model.features[1].running_mean, stats)


def test_normalized_student_is_tapped_through_the_wrapper() -> None:
    model = build_student("small-cnn", num_classes=10, in_channels=3, image_size=16, normalize=(0.5, 0.25))
    with FeatureTap(model, feature_map=True) as tap:
        model(torch.rand(2, 3, 16, 16))
    assert tap.feature_map_location == FeatureMapLocation("net.features")
    assert tap.fc_weight is model.net.classifier.weight
    torch.testing.assert_close(tap.feature_map.mean(dim=(2, 3)), tap.penultimate)


class _FlattenHead(nn.Module):
    """A head that flattens the map: no map averages to the Linear's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_unsupported_model_raises_a_clear_error_and_cleans_up() -> None:
    model = _FlattenHead()
    before = _hook_count(model)
    with pytest.raises(UserError, match=r"does not support _FlattenHead.*feature_map_module="):
        with FeatureTap(model, feature_map=True):
            model(torch.rand(2, 3, 8, 8))
    assert _hook_count(model) == before


def test_explicit_module_and_transform() -> None:
    torch.manual_seed(0)
    model = _preact_bn_before_fc()
    x = torch.rand(2, 3, 32, 32)
    with FeatureTap(model, feature_map_module="bn", feature_map_transform="relu") as tap:
        model(x)
    torch.testing.assert_close(tap.feature_map.mean(dim=(2, 3)), tap.penultimate)
    with FeatureTap(model, feature_map_module="bn") as raw:
        model(x)
    assert (raw.feature_map < 0).any()
    with pytest.raises(UserError, match="did you mean: bn"):
        FeatureTap(model, feature_map_module="bnn")
    with pytest.raises(UserError, match="None or 'relu'"):
        FeatureTap(model, feature_map_module="bn", feature_map_transform="gelu")


def test_reading_before_any_forward_is_an_error() -> None:
    model = _small_cnn()
    with FeatureTap(model, feature_map=True) as tap:
        with pytest.raises(RuntimeError, match="no forward pass"):
            _ = tap.feature_map
        with pytest.raises(RuntimeError, match="no forward pass"):
            _ = tap.penultimate


def test_model_without_linear_is_rejected() -> None:
    with pytest.raises(UserError, match=r"no nn\.Linear"):
        FeatureTap(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_cam_validates_shapes() -> None:
    fmap, weight = torch.rand(2, 4, 3, 3), torch.rand(5, 4)
    assert cam(fmap, weight, torch.tensor([0, 4])).shape == (2, 3, 3)
    with pytest.raises(ValueError, match="fc_weight"):
        cam(fmap, torch.rand(5, 3), 0)
    with pytest.raises(ValueError, match="classes"):
        cam(fmap, weight, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="feature_map"):
        cam(fmap[:, :, 0], weight, 0)


def test_a_reused_tap_starts_empty() -> None:
    model = _small_cnn()
    tap = FeatureTap(model, feature_map=True)
    with tap:
        model(torch.rand(2, 1, 8, 8))
    with tap:
        with pytest.raises(RuntimeError, match="no forward pass"):
            _ = tap.feature_map
        model(torch.rand(3, 1, 8, 8))
    assert tap.feature_map.shape[0] == 3
