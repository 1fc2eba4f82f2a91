"""Teachers: frozen, always eval, ensembles with weights, batch memo, spec parsing."""

from __future__ import annotations

import pytest
import torch

from robustbench_kd.context import BatchContext
from robustbench_kd.errors import UserError
from robustbench_kd.teachers import EnsembleTeacher, Teacher, TeacherSet, TeacherSpec
from robustbench_kd.testing import TinyNet
from robustbench_kd.testing.runs import digits_load_context
from robustbench_kd.threat import ThreatSpec


def test_teacher_is_frozen_and_stays_in_eval():
    t = Teacher(TinyNet(4))
    t.train()
    assert not t.training and not t.net.training
    assert not any(p.requires_grad for p in t.parameters())


def test_input_gradients_flow_through_a_teacher():
    t = Teacher(TinyNet(4))
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    t(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in t.parameters())


def test_ensemble_of_probabilities_matches_hand_computation():
    a, b = Teacher(TinyNet(4, seed=1)), Teacher(TinyNet(4, seed=2))
    ens = EnsembleTeacher([a, b], weights=[1, 3])  # normalised to 0.25 / 0.75
    x = torch.rand(5, 1, 8, 8)
    expected = 0.25 * a(x).softmax(1) + 0.75 * b(x).softmax(1)
    assert torch.allclose(ens(x).softmax(1), expected, atol=1e-6)
    assert torch.allclose(ens(x).exp(), expected, atol=1e-6)


def test_ensemble_of_logits():
    a, b = Teacher(TinyNet(4, seed=1)), Teacher(TinyNet(4, seed=2))
    x = torch.rand(5, 1, 8, 8)
    ens = EnsembleTeacher([a, b], weights=[0.5, 0.5], combine="logits")
    assert torch.allclose(ens(x), 0.5 * a(x) + 0.5 * b(x), atol=1e-6)


@pytest.mark.parametrize("weights,message", [([1.0], "1 teacher weights given for 2"), ([-1, 2], "non-negative")])
def test_bad_ensemble_weights(weights, message):
    with pytest.raises(UserError, match=message):
        EnsembleTeacher([Teacher(TinyNet(4)), Teacher(TinyNet(4))], weights=weights)


def test_teacher_outputs_are_memoised_per_batch():
    calls = []
    net = TinyNet(4)
    net.register_forward_hook(lambda *a: calls.append(1))
    ctx = BatchContext(
        x=torch.rand(3, 1, 8, 8),
        y=torch.zeros(3, dtype=torch.long),
        student=TinyNet(4),
        teachers=TeacherSet({"robust": Teacher(net)}),
        threat=ThreatSpec(eps=0.1, alpha=0.1),
    )
    first = ctx.teacher_logits("robust")
    assert ctx.teacher_logits("robust") is first and not first.requires_grad
    ctx.x_adv = ctx.x + 0.01
    ctx.teacher_probs("robust", on="adv")
    ctx.teacher_probs("robust", on="adv", temperature=4)
    assert len(calls) == 2
    ctx.x_adv = ctx.x - 0.01  # a new x_adv invalidates the adv memo only
    ctx.teacher_logits("robust", on="adv")
    assert len(calls) == 3


def test_teacher_probabilities_are_memoised_per_temperature_and_follow_x_adv():
    ctx = BatchContext(
        x=torch.rand(3, 1, 8, 8),
        y=torch.zeros(3, dtype=torch.long),
        student=TinyNet(4),
        teachers=TeacherSet({"robust": Teacher(TinyNet(4))}),
        threat=ThreatSpec(eps=0.1, alpha=0.1),
    )
    p1, p4 = ctx.teacher_probs("robust"), ctx.teacher_probs("robust", temperature=4.0)
    assert ctx.teacher_probs("robust") is p1 and ctx.teacher_probs("robust", temperature=4) is p4
    logits = ctx.teacher_logits("robust")
    assert torch.allclose(p1, logits.softmax(1)) and torch.allclose(p4, (logits / 4).softmax(1))
    ctx.x_adv = ctx.x + 0.01
    before = ctx.teacher_probs("robust", on="adv")
    ctx.x_adv = ctx.x - 0.01  # stale adversarial probabilities must not survive a new x_adv
    after = ctx.teacher_probs("robust", on="adv")
    assert after is not before and torch.allclose(after, ctx.teacher_logits("robust", on="adv").softmax(1))
    assert ctx.teacher_probs("robust") is p1  # the clean ones stay


def test_missing_role_is_a_clear_error():
    with pytest.raises(UserError, match=r"no teacher for role 'natural' \(configured roles: robust\)"):
        TeacherSet({"robust": Teacher(TinyNet(4))})["natural"]


@pytest.mark.parametrize(
    "text,scheme,ref,options",
    [
        ("robustbench:cifar10/Linf/Carmon2019Unlabeled", "robustbench", "cifar10/Linf/Carmon2019Unlabeled", {}),
        (
            "file:runs/a/checkpoints/epoch_020.pt?arch=resnet18&width=2",
            "file",
            "runs/a/checkpoints/epoch_020.pt",
            {"arch": "resnet18", "width": "2"},
        ),
    ],
)
def test_spec_parsing(text, scheme, ref, options):
    spec = TeacherSpec.parse(text)
    assert (spec.scheme, spec.ref, spec.options) == (scheme, ref, options)


def test_spec_without_scheme_explains_the_format():
    with pytest.raises(UserError, match="has no scheme"):
        TeacherSpec.parse("Carmon2019Unlabeled")


def test_unknown_scheme_lists_registered_ones(host):
    from robustbench_kd.training.builders import load_teacher

    ctx = digits_load_context()
    with pytest.raises(UserError, match=r"unknown teacher source 'hf'.*valid: file, robustbench"):
        load_teacher(host, "hf:someone/model", ctx)
