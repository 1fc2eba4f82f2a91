"""Vectorised teacher ensembles: same outputs and input gradients as the member loop, fallback, errors."""

from __future__ import annotations

import pytest
import torch

from robustbench_kd.config import config_from_mapping
from robustbench_kd.errors import UserError
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.students import build_student
from robustbench_kd.teachers import EnsembleTeacher, Teacher
from robustbench_kd.testing import TinyNet
from robustbench_kd.testing.runs import digits_load_context
from robustbench_kd.training.builders import load_role

WEIGHTS = [0.1, 0.2, 0.3, 0.4]


def _randomise_bn(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial running statistics, so eval-mode BN differs per member and from batch statistics."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return net


def small_cnn_members(m: int = 4, width: float = 1.0) -> list[Teacher]:
    members = []
    for i in range(m):
        torch.manual_seed(100 + i)
        net = build_student("small-cnn", num_classes=10, in_channels=3, image_size=8, width=width)
        members.append(Teacher(_randomise_bn(net, i), spec=f"cnn{i}"))
    return members


def tiny_members(m: int = 4) -> list[Teacher]:
    return [Teacher(_randomise_bn(TinyNet(4, seed=i), i), spec=f"tiny{i}") for i in range(m)]


FAMILIES = {"small-cnn": (small_cnn_members, (3, 8, 8)), "tinynet": (tiny_members, (1, 8, 8))}


def hand_combination(members, weights, x, combine):
    """The formula from the docstring, member by member."""
    z = [t(x) for t in members]
    if combine == "logits":
        return sum(w * zi for w, zi in zip(weights, z, strict=False))
    return torch.log(sum(w * zi.softmax(1) for w, zi in zip(weights, z, strict=False)))


def input_grad(model, x, probe):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((model(x) * probe).sum(), x)
    return g


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("combine", ["probs", "logits"])
def test_vectorised_matches_loop_outputs_and_input_gradients(family, combine):
    make, shape = FAMILIES[family]
    members = make()
    vec = EnsembleTeacher(members, weights=WEIGHTS, combine=combine, vectorize=True)
    loop = EnsembleTeacher(members, weights=WEIGHTS, combine=combine, vectorize=False)
    assert vec.vectorizes_on("cpu") and not loop.can_vectorize
    x = torch.rand(6, *shape, generator=torch.Generator().manual_seed(0))
    expected = hand_combination(members, WEIGHTS, x, combine)
    assert torch.allclose(vec(x), expected, atol=1e-5)
    assert torch.allclose(loop(x), expected, atol=1e-5)
    probe = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    g_vec, g_loop = input_grad(vec, x, probe), input_grad(loop, x, probe)
    assert g_vec.abs().sum() > 0
    assert torch.allclose(g_vec, g_loop, atol=1e-5, rtol=1e-4)
    # Teachers stay frozen: no parameter asks for or received a gradient.
    assert all(not p.requires_grad and p.grad is None for p in vec.parameters())


def test_weights_are_respected():
    members = small_cnn_members()
    x = torch.rand(5, 3, 8, 8)
    one_hot = EnsembleTeacher(members, weights=[0, 0, 1, 0], vectorize=True)
    assert torch.allclose(one_hot(x), members[2](x).log_softmax(1), atol=1e-5)
    logits = EnsembleTeacher(members, weights=[1, 2, 3, 4], combine="logits", vectorize=True)  # normalised to 0.1..0.4
    assert torch.allclose(logits(x), hand_combination(members, WEIGHTS, x, "logits"), atol=1e-5)


def test_auto_vectorises_on_accelerators_only():
    """On CPU the loop measured faster (bench/ensemble_speed.py); elsewhere one call replaces M."""
    ens = EnsembleTeacher(tiny_members())
    assert ens.can_vectorize and ens.loop_reason is None
    assert not ens.vectorizes_on("cpu") and ens.vectorizes_on("cuda") and ens.vectorizes_on("mps")
    assert EnsembleTeacher(tiny_members(), vectorize=True).vectorizes_on("cpu")
    assert not EnsembleTeacher(tiny_members(), vectorize=False).vectorizes_on("cuda")


def test_mixed_architectures_fall_back_to_the_loop():
    members = small_cnn_members(2) + small_cnn_members(2, width=2.0)
    ens = EnsembleTeacher(members, weights=WEIGHTS)
    assert not ens.can_vectorize and ens.loop_reason.startswith("member 2 submodule 'features.0' is Conv2d(3, 64")
    x = torch.rand(4, 3, 8, 8)
    assert torch.allclose(ens(x), hand_combination(members, WEIGHTS, x, "probs"), atol=1e-5)


def test_equal_shapes_but_different_layer_settings_are_not_vectorised():
    """Padding changes what conv computes but no tensor shape: vectorising would run member 0's padding."""
    a, b = TinyNet(4, seed=1), TinyNet(4, seed=2)
    b.conv.padding = (2, 2)
    ens = EnsembleTeacher([Teacher(a), Teacher(b)])
    assert not ens.can_vectorize and "submodule 'conv'" in ens.loop_reason
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(ens(x), hand_combination([Teacher(a), Teacher(b)], [0.5, 0.5], x, "probs"), atol=1e-6)


def test_members_with_forward_hooks_are_looped_so_hooks_see_each_member():
    calls = []
    members = tiny_members(3)
    members[1].net.register_forward_hook(lambda *a: calls.append(1))
    ens = EnsembleTeacher(members)
    assert not ens.can_vectorize and "forward hooks" in ens.loop_reason
    ens(torch.rand(2, 1, 8, 8))
    assert calls == [1]


def test_forcing_vectorisation_of_mixed_architectures_is_a_user_error():
    members = [Teacher(TinyNet(4, width=8)), Teacher(TinyNet(4, width=16))]
    with pytest.raises(UserError, match=r"vectorize = true needs members of one architecture, but member 1"):
        EnsembleTeacher(members, vectorize=True)
    with pytest.raises(UserError, match=r"vectorize must be \"auto\", true or false, got 'yes'"):
        EnsembleTeacher(members, vectorize="yes")


def test_stacks_follow_moves_casts_and_loaded_weights():
    members = tiny_members()
    ens = EnsembleTeacher(members, weights=WEIGHTS, vectorize=True)
    x = torch.rand(3, 1, 8, 8)
    ens(x)  # builds the stacks
    ens.to(torch.float64)
    x64 = x.double()
    assert ens(x64).dtype == torch.float64
    assert torch.allclose(ens(x64), hand_combination(members, WEIGHTS, x64, "probs"), atol=1e-10)
    # In-place weight updates of a member (load_state_dict) reach the vectorised call.
    members[1].net.load_state_dict(_randomise_bn(TinyNet(4, seed=42), 7).double().state_dict())
    assert torch.allclose(ens(x64), hand_combination(members, WEIGHTS, x64, "probs"), atol=1e-10)
    # Replaced tensors (assign=True) are noticed too.
    members[2].net.load_state_dict(TinyNet(4, seed=43).double().state_dict(), assign=True)
    members[2].requires_grad_(False)
    assert torch.allclose(ens(x64), hand_combination(members, WEIGHTS, x64, "probs"), atol=1e-10)


def test_state_dict_and_members_are_unchanged_by_vectorising():
    members = tiny_members()
    vec = EnsembleTeacher(members, vectorize=True)
    vec(torch.rand(2, 1, 8, 8))
    loop = EnsembleTeacher(tiny_members(), vectorize=False)
    assert list(vec.state_dict()) == list(loop.state_dict())
    assert len(vec.members) == 4 and vec.members[0] is members[0]
    for key, value in vec.state_dict().items():
        assert torch.equal(value, loop.state_dict()[key])


def test_config_accepts_vectorize_and_builders_pass_it(tmp_path):
    net = build_student("small-cnn", num_classes=10, in_channels=1, image_size=8)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "t.pt")
    spec = f"file:{tmp_path / 't.pt'}?arch=small-cnn"
    role = {"specs": [spec, spec, spec], "weights": [1, 1, 2], "vectorize": False}
    config = config_from_mapping({"teachers": {"robust": role}, "method": {"name": "akd"}})
    host = PluginHost.create(autoload=False)
    ctx = digits_load_context(host)
    assert not load_role(host, config.teachers["robust"], ctx).can_vectorize
    assert load_role(host, {**role, "vectorize": True}, ctx).vectorizes_on("cpu")
    with pytest.raises(UserError, match=r"teachers.robust.vectorize must be \"auto\", true or false, got 'on'"):
        config_from_mapping({"teachers": {"robust": {**role, "vectorize": "on"}}, "method": {"name": "akd"}})
