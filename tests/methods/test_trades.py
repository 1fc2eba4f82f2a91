"""Numeric and protocol tests of ``trades``."""

from __future__ import annotations

import pytest
import torch
from robustbench_kd_plugins import trades
from robustbench_kd_plugins.trades import CLEAN_PROBS_KEY, TRADES
from torch import nn

from robustbench_kd.context import BatchContext
from robustbench_kd.errors import UserError
from robustbench_kd.registry import Registry
from robustbench_kd.teachers import TeacherSet
from robustbench_kd.testing import Affine, TinyNet, batch_context, cross_entropy, softmax
from robustbench_kd.testing import kl as kl_ref
from robustbench_kd.testing.stubs import assert_loss_trains_student, attacked_batch
from robustbench_kd.threat import ThreatSpec

THREAT = ThreatSpec(eps=0.031, alpha=0.007, steps=10)
X = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.5, 0.0, 1.0], [0.7, 0.2, 0.4, 0.6]])
X_ADV = torch.tensor([[0.9, 0.1, 0.3, 0.2], [0.5, 0.6, 0.8, 0.0], [0.1, 0.2, 0.9, 0.6]])
Y = torch.tensor([1, 3, 0])


def _ctx(student: nn.Module) -> BatchContext:
    return batch_context(X, Y, student=student, x_adv=X_ADV, threat=THREAT)


def test_attack_spec() -> None:
    spec = TRADES().attack_spec(THREAT)
    assert (spec.eps, spec.alpha, spec.steps) == (0.031, 0.007, 10)
    assert spec.init == "gauss" and spec.init_std == pytest.approx(1e-3)
    assert spec.student_mode == "eval"
    assert TRADES(TRADES.Config(attack_student_mode="train")).attack_spec(THREAT).student_mode == "train"


def test_loss_ce_plus_beta_batchmean_kl_by_hand() -> None:
    ctx = _ctx(Affine(2.0))
    out = TRADES(num_classes=4).loss(ctx)
    ce = kl = 0.0
    for b in range(3):
        z_nat = (2.0 * X[b]).double().tolist()
        z_adv = (2.0 * X_ADV[b]).double().tolist()
        ce += cross_entropy(z_nat, int(Y[b]))
        kl += kl_ref(softmax(z_nat), softmax(z_adv))
    ce, kl = ce / 3, kl / 3
    assert out.terms["ce_nat"].item() == pytest.approx(ce, rel=1e-6)
    assert out.terms["kl_adv"].item() == pytest.approx(kl, rel=1e-5)
    assert out.total.item() == pytest.approx(ce + 6.0 * kl, rel=1e-6)
    beta2 = TRADES(TRADES.Config(beta=2.0)).loss(_ctx(Affine(2.0)))
    assert beta2.total.item() == pytest.approx(ce + 2.0 * kl, rel=1e-6)
    mean_all = TRADES(TRADES.Config(kl_reduction="mean_all")).loss(_ctx(Affine(2.0)))
    assert mean_all.terms["kl_adv"].item() == pytest.approx(kl / 4, rel=1e-5)


def test_gradient_flows_through_both_clean_and_adversarial_outputs() -> None:
    torch.manual_seed(0)
    student = nn.Linear(4, 4)
    ctx = _ctx(student)
    TRADES().loss(ctx).total.backward()
    got = student.weight.grad.clone()

    def reference(detach_target: bool) -> torch.Tensor:
        student.zero_grad()
        z_nat, z_adv = student(X), student(X_ADV)
        p_nat = torch.softmax(z_nat.detach() if detach_target else z_nat, dim=1)
        kl = (p_nat * (torch.log(p_nat) - torch.log_softmax(z_adv, dim=1))).sum(dim=1).mean()
        (torch.nn.functional.cross_entropy(z_nat, Y) + 6.0 * kl).backward()
        return student.weight.grad.clone()

    assert torch.allclose(got, reference(detach_target=False), atol=1e-6)
    assert not torch.allclose(got, reference(detach_target=True), atol=1e-4)


def test_recompute_clean_target_same_value_one_more_forward() -> None:
    a, b = Affine(2.0), Affine(2.0)
    out_a = TRADES().loss(_ctx(a))
    out_b = TRADES(TRADES.Config(recompute_clean_target=True)).loss(_ctx(b))
    assert out_a.total.item() == pytest.approx(out_b.total.item(), rel=1e-7)
    assert (a.calls, b.calls) == (2, 3)


def test_attack_loss_targets_clean_probs_computed_once() -> None:
    student = Affine(2.0)
    ctx = _ctx(student)
    distiller = TRADES()
    first = distiller.attack_loss(ctx, X_ADV)
    second = distiller.attack_loss(ctx, X_ADV)
    assert student.calls == 3  # one clean forward (cached) + two adversarial forwards
    assert not ctx.extras[CLEAN_PROBS_KEY].requires_grad
    expected = [kl_ref(softmax(2.0 * X[b]), softmax(2.0 * X_ADV[b])) for b in range(3)]
    assert first.tolist() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(first, second)


def test_end_to_end_batch_attack_target_in_eval_mode() -> None:
    torch.manual_seed(0)
    student = TinyNet(10).train()
    student.bn.running_mean.uniform_(-0.5, 0.5)  # make eval and train BN outputs differ
    distiller = TRADES()
    ctx = attacked_batch(distiller, student, threat=ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=2))
    assert student.training
    student.eval()
    with torch.no_grad():
        eval_probs = torch.softmax(student(ctx.x), dim=1)
    student.train()
    assert torch.allclose(ctx.extras[CLEAN_PROBS_KEY], eval_probs, atol=1e-6)
    assert_loss_trains_student(distiller, ctx)


def test_attack_target_uses_eval_bn_whoever_calls_first_and_restores_modes() -> None:
    torch.manual_seed(0)
    student = TinyNet(10).train()
    student.bn.running_mean.uniform_(-0.5, 0.5)
    student.conv.eval()  # a deliberately frozen submodule must stay as it was
    ctx = BatchContext(
        x=torch.rand(4, 1, 8, 8),
        y=torch.zeros(4, dtype=torch.long),
        student=student,
        teachers=TeacherSet(),
        threat=ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=2),
    )
    TRADES().attack_loss(ctx, ctx.x.clone())  # e.g. a contract probe before the attack, student in train mode
    assert student.training and student.bn.training and not student.conv.training
    student.eval()
    with torch.no_grad():
        eval_probs = torch.softmax(student(ctx.x), dim=1)
    assert torch.allclose(ctx.extras[CLEAN_PROBS_KEY], eval_probs, atol=1e-6)


def test_registration_and_validation() -> None:
    registry = Registry("method")
    trades.rbkd_register_methods(registry.bound("trades"))
    assert registry.get("trades") is TRADES
    assert TRADES.teacher_roles == ()
    with pytest.raises(UserError):
        TRADES.Config(kl_reduction="mean")
    with pytest.raises(UserError):
        TRADES.Config(beta=-1.0)
