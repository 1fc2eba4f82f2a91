"""Numeric and protocol tests of ``akd`` (label mixing at x', teacher ensembles)."""

from __future__ import annotations

import pytest
import torch
from robustbench_kd_plugins import akd
from robustbench_kd_plugins.akd import AKD
from torch import nn

from robustbench_kd.context import BatchContext
from robustbench_kd.errors import UserError
from robustbench_kd.registry import Registry
from robustbench_kd.teachers import EnsembleTeacher, Teacher, TeacherSet
from robustbench_kd.testing import Affine, TinyNet, batch_context, check_distiller, softmax
from robustbench_kd.testing.stubs import assert_loss_trains_student, attacked_batch, soft_cross_entropy
from robustbench_kd.threat import ThreatSpec

THREAT = ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=10)
X = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.5, 0.0, 1.0], [0.7, 0.2, 0.4, 0.6]])
X_ADV = torch.tensor([[0.9, 0.1, 0.3, 0.2], [0.5, 0.6, 0.8, 0.0], [0.1, 0.2, 0.9, 0.6]])
Y = torch.tensor([1, 3, 0])
BIAS_1 = torch.tensor([0.5, -1.0, 2.0, 0.0])
BIAS_2 = torch.tensor([-0.5, 1.5, 0.0, 1.0])


def _ctx(teacher: nn.Module) -> BatchContext:
    """The batch with ``teacher`` (already a Teacher or an EnsembleTeacher) as the robust role."""
    ctx = batch_context(X, Y, student=Affine(3.0), x_adv=X_ADV, threat=THREAT)
    ctx.teachers = TeacherSet({"robust": teacher})
    return ctx


def _hand(alpha: float, teacher_probs) -> float:
    """mean_b CE(p_S(x'_b), alpha * p_T(x'_b) + (1 - alpha) * onehot(y_b)); teacher_probs(b) -> list."""
    total = 0.0
    for b in range(3):
        q = [alpha * p + (1 - alpha) * (1.0 if k == int(Y[b]) else 0.0) for k, p in enumerate(teacher_probs(b))]
        total += soft_cross_entropy(q, 3.0 * X_ADV[b])
    return total / 3


def test_attack_spec_pgd7_uniform_eval() -> None:
    spec = AKD().attack_spec(THREAT)
    assert spec.steps == 7  # paper's PGD-7 overrides the threat's 10
    assert (spec.eps, spec.alpha) == (THREAT.eps, THREAT.alpha)
    assert spec.init == "uniform"
    assert spec.student_mode == "eval"
    assert AKD(AKD.Config(steps=None)).attack_spec(THREAT).steps == 10
    assert AKD(AKD.Config(steps=3)).attack_spec(THREAT).steps == 3


def test_default_alpha_is_three_quarters() -> None:
    assert AKD.Config().alpha == 0.75


@pytest.mark.parametrize("alpha", [0.75, 1.0, 0.3])
def test_label_mixed_target_at_adversarial_input_by_hand(alpha: float) -> None:
    teacher = Teacher(Affine(4.0, BIAS_1))
    ctx = _ctx(teacher)
    out = AKD(AKD.Config(alpha=alpha)).loss(ctx)
    expected = _hand(alpha, lambda b: softmax((4.0 * X_ADV[b] + BIAS_1).double().tolist()))  # teacher at x'
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    assert set(ctx._memo) == {("robust", "adv")}
    assert ctx.student.calls == 1  # only the student on x'
    terms = out.terms
    combo = alpha * terms["ce_teacher"] + (1 - alpha) * terms["ce_label"]
    assert terms["ce_mixed"].item() == pytest.approx(combo.item(), rel=1e-5)


def test_alpha_zero_is_pgd_at() -> None:
    out = AKD(AKD.Config(alpha=0.0)).loss(_ctx(Teacher(Affine(4.0, BIAS_1))))
    ce = torch.nn.functional.cross_entropy(3.0 * X_ADV, Y)
    assert out.total.item() == pytest.approx(ce.item(), rel=1e-6)


def test_weighted_ensemble_gives_eq5_by_hand() -> None:
    t1, t2 = Teacher(Affine(4.0, BIAS_1)), Teacher(Affine(-2.0, BIAS_2))
    ensemble = EnsembleTeacher([t1, t2], weights=[0.25, 0.75])
    alpha = 0.8

    def mixed_teacher(b: int) -> list[float]:
        p1 = softmax((4.0 * X_ADV[b] + BIAS_1).double().tolist())
        p2 = softmax((-2.0 * X_ADV[b] + BIAS_2).double().tolist())
        return [0.25 * a + 0.75 * c for a, c in zip(p1, p2, strict=True)]

    ctx = _ctx(ensemble)
    out = AKD(AKD.Config(alpha=alpha)).loss(ctx)
    assert out.total.item() == pytest.approx(_hand(alpha, mixed_teacher), rel=1e-5)
    q = AKD(AKD.Config(alpha=alpha)).target(ctx)
    expected_q = torch.tensor(
        [[alpha * p + (1 - alpha) * (k == int(Y[b])) for k, p in enumerate(mixed_teacher(b))] for b in range(3)],
        dtype=q.dtype,
    )
    assert torch.allclose(q, expected_q, atol=1e-6)
    assert torch.allclose(q.sum(dim=1), torch.ones(3), atol=1e-6)


def test_attack_loss_is_hard_label_ce() -> None:
    got = AKD().attack_loss(_ctx(Teacher(Affine(4.0, BIAS_1))), X_ADV)
    ce = torch.nn.functional.cross_entropy(3.0 * X_ADV, Y, reduction="none")
    assert torch.allclose(got, ce, atol=1e-6)


def test_end_to_end_batch_with_ensemble() -> None:
    torch.manual_seed(0)
    student = TinyNet(10).train()
    teachers = [Teacher(TinyNet(10, seed=1)), Teacher(TinyNet(10, seed=2))]
    ensemble = EnsembleTeacher(teachers, weights=[0.25, 0.75])
    distiller = AKD()
    threat = ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=10)
    ctx = attacked_batch(distiller, student, {"robust": ensemble}, threat=threat)
    assert student.training
    assert_loss_trains_student(distiller, ctx, frozen=teachers)


def test_registration_and_validation() -> None:
    registry = Registry("method")
    akd.rbkd_register_methods(registry.bound("akd"))
    assert registry.get("akd") is AKD
    assert AKD.teacher_roles == ("robust",)
    assert "2203.07159" in AKD.paper
    with pytest.raises(UserError):
        AKD.Config(alpha=-0.1)
    with pytest.raises(UserError):
        AKD.Config(steps=-1)


def test_contract_with_the_threat_steps() -> None:
    """``steps=None`` (Python only: a run file has no None) is not in test_contract's VARIANTS."""
    check_distiller(AKD, config=AKD.Config(alpha=1.0, steps=None))
