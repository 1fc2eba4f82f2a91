"""Numeric and protocol tests of ``ard``."""

from __future__ import annotations

import pytest
import torch
from robustbench_kd_plugins import ard
from robustbench_kd_plugins.ard import ARD, ard_loss

from robustbench_kd.context import BatchContext
from robustbench_kd.errors import UserError
from robustbench_kd.registry import Registry
from robustbench_kd.teachers import Teacher
from robustbench_kd.testing import Affine, TinyNet, batch_context, cross_entropy, softmax
from robustbench_kd.testing import kl as kl_ref
from robustbench_kd.testing.stubs import assert_loss_trains_student, attacked_batch, soft_cross_entropy, wmse
from robustbench_kd.threat import ThreatSpec

THREAT = ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=10)
X = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.5, 0.0, 1.0], [0.7, 0.2, 0.4, 0.6]])
X_ADV = torch.tensor([[0.9, 0.1, 0.3, 0.2], [0.5, 0.6, 0.8, 0.0], [0.1, 0.2, 0.9, 0.6]])
Y = torch.tensor([1, 3, 0])
T_BIAS = torch.tensor([0.5, -1.0, 2.0, 0.0])


def _ctx() -> BatchContext:
    # Teacher scale 40 so that its tau = 30 distribution is far from uniform.
    return batch_context(
        X, Y, student=Affine(30.0), teachers={"robust": Affine(40.0, T_BIAS)}, x_adv=X_ADV, threat=THREAT
    )


def _hand(tau: float) -> tuple[float, float]:
    """(batchmean KL(p_T^tau(x) || p_S^tau(x')), mean CE(z_S(x), y))."""
    kl = ce = 0.0
    for b in range(3):
        zt = (40.0 * X[b] + T_BIAS).double().tolist()  # teacher on CLEAN x
        zs_adv = (30.0 * X_ADV[b]).double().tolist()
        zs_nat = (30.0 * X[b]).double().tolist()
        kl += kl_ref(softmax(zt, tau), softmax(zs_adv, tau))
        ce += cross_entropy(zs_nat, int(Y[b]))
    return kl / 3, ce / 3


def test_attack_spec() -> None:
    spec = ARD().attack_spec(THREAT)
    assert (spec.eps, spec.alpha, spec.steps) == (THREAT.eps, THREAT.alpha, 10)
    assert spec.init == "uniform"
    assert spec.student_mode == "train"


def test_default_loss_tau_squared_mean_all_by_hand() -> None:
    ctx = _ctx()
    out = ARD(num_classes=4).loss(ctx)
    kl, ce = _hand(30.0)
    assert out.terms["kl_adv"].item() == pytest.approx(kl / 4, rel=1e-5)  # mean over B*C
    assert out.total.item() == pytest.approx(900.0 * kl / 4, rel=1e-5)  # alpha = 1: no CE
    assert out.terms["ce_nat"].item() == pytest.approx(ce, rel=1e-6)  # logged from the clean pass
    assert ctx.student.calls == 2  # x' then x, as the reference


def test_alpha_mixes_clean_ce() -> None:
    out = ARD(ARD.Config(alpha=0.7)).loss(_ctx())
    kl, ce = _hand(30.0)
    assert out.total.item() == pytest.approx(0.7 * 900.0 * kl / 4 + 0.3 * ce, rel=1e-5)
    out = ARD(ARD.Config(temperature=2.0, alpha=0.5, kl_reduction="batchmean")).loss(_ctx())
    kl2, ce2 = _hand(2.0)
    assert out.total.item() == pytest.approx(0.5 * 4.0 * kl2 + 0.5 * ce2, rel=1e-5)


def test_clean_forward_flag() -> None:
    ctx = _ctx()
    out = ARD(ARD.Config(clean_forward_when_unused=False)).loss(ctx)
    assert ctx.student.calls == 1
    assert "ce_nat" not in out.terms


def test_teacher_is_evaluated_on_clean_input_only() -> None:
    ctx = _ctx()
    teacher_net = ctx.teachers["robust"].net
    ARD().loss(ctx)
    assert teacher_net.calls == 1
    assert set(ctx._memo) == {("robust", "clean")}


def test_attack_loss_is_per_samplecross_entropy() -> None:
    ctx = _ctx()
    got = ARD().attack_loss(ctx, X_ADV)
    assert got.tolist() == pytest.approx([cross_entropy(30.0 * X_ADV[b], int(Y[b])) for b in range(3)], rel=1e-6)


def test_end_to_end_batch_attack_in_train_mode_updates_bn() -> None:
    torch.manual_seed(0)
    student, teacher = TinyNet(10).train(), Teacher(TinyNet(10, seed=1))
    distiller = ARD()
    tracked = int(student.bn.num_batches_tracked)
    threat = ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=3)
    ctx = attacked_batch(distiller, student, {"robust": teacher}, threat=threat)
    assert int(student.bn.num_batches_tracked) == tracked + 3  # batch statistics at every attack step
    assert student.training
    assert_loss_trains_student(distiller, ctx, frozen=[teacher])


def test_registration_and_validation() -> None:
    registry = Registry("method")
    ard.rbkd_register_methods(registry.bound("ard"))
    assert registry.get("ard") is ARD
    assert ARD.teacher_roles == ("robust",)
    with pytest.raises(UserError):
        ARD.Config(alpha=1.1)
    with pytest.raises(UserError):
        ARD.Config(attack_student_mode="training")


def test_ard_loss_weights_the_reduced_divergence_and_the_clean_ce() -> None:
    logits_nat = 30.0 * X
    per_sample = torch.tensor([0.3, 0.6, 0.9])
    ce = sum(cross_entropy(logits_nat[b], int(Y[b])) for b in range(3)) / 3
    out = ard_loss(
        per_sample, Y, logits_nat=logits_nat, alpha=0.5, temperature=2.0, reduction="batchmean", num_classes=4
    )
    assert out.terms["kl_adv"].item() == pytest.approx(0.6)
    assert out.total.item() == pytest.approx(0.5 * 4.0 * 0.6 + 0.5 * ce, rel=1e-6)
    logged = ard_loss(
        per_sample,
        Y,
        logits_nat=logits_nat,
        alpha=1.0,
        temperature=2.0,
        reduction="mean_all",
        num_classes=4,
        name="ikl",
    )
    assert logged.total.item() == pytest.approx(4.0 * 0.6 / 4) and set(logged.terms) == {"ikl_adv", "ce_nat"}
    assert logged.terms["ce_nat"].item() == pytest.approx(ce, rel=1e-6)
    assert set(
        ard_loss(per_sample, Y, logits_nat=None, alpha=1.0, temperature=2.0, reduction="sum", num_classes=4).terms
    ) == {"kl_adv"}


# -- IKL in place of the KL (divergence="ikl") -----------------------------------------------------
def _hand_ikl(tau: float, mse_w: float, sce_w: float, rows: list[list[float]] | None = None) -> float:
    """batchmean of mse_w * wMSE(z_T(x)/tau, z_S(x')/tau) + sce_w * sCE(p_T^tau(x) -> p_S^tau(x'))."""
    rows = rows or [[0.25] * 4] * 4
    total = 0.0
    for b in range(3):
        zt = [v / tau for v in (40.0 * X[b] + T_BIAS).double().tolist()]
        zs = [v / tau for v in (30.0 * X_ADV[b]).double().tolist()]
        total += mse_w * wmse(zt, zs, rows[int(Y[b])]) + sce_w * soft_cross_entropy(softmax(zt), zs)
    return total / 3


def test_default_divergence_is_kl_without_prior_state() -> None:
    assert ARD.Config().divergence == "kl"
    assert ARD(num_classes=4).state_dict() == {}
    assert set(ARD(ARD.Config(divergence="ikl"), num_classes=4).state_dict()) == {"prior.prior", "prior.accumulator"}


def test_ikl_by_hand_at_temperature() -> None:
    config = ARD.Config(divergence="ikl", temperature=2.0, alpha=0.5, kl_reduction="batchmean")
    out = ARD(config, num_classes=4).loss(_ctx())
    ikl = _hand_ikl(2.0, mse_w=5.0, sce_w=1.0)
    _, ce = _hand(2.0)
    assert out.terms["ikl_adv"].item() == pytest.approx(ikl, rel=1e-5)
    assert out.total.item() == pytest.approx(0.5 * 4.0 * ikl + 0.5 * ce, rel=1e-5)
    assert "kl_adv" not in out.terms


def test_ikl_tau_squared_cancels_on_the_wmse() -> None:
    """At tau = 30 the wMSE part of alpha tau^2 IKL equals the wMSE of the raw logits."""
    config = ARD.Config(divergence="ikl", ikl_sce_weight=0.0, ikl_mse_weight=1.0, kl_reduction="batchmean")
    out = ARD(config, num_classes=4).loss(_ctx())
    raw = _hand_ikl(1.0, mse_w=1.0, sce_w=0.0)
    assert out.total.item() == pytest.approx(raw, rel=1e-5)


def test_ikl_prior_from_teacher_clean_outputs() -> None:
    distiller = ARD(ARD.Config(divergence="ikl", temperature=2.0, kl_reduction="batchmean"), num_classes=4)
    ctx = _ctx()
    distiller.after_step(ctx, distiller.loss(ctx))
    distiller.on_epoch_end(0, 2)
    rows = [[0.25] * 4 for _ in range(4)]
    for b in range(3):  # the prior's own temperature (4), not tau
        rows[int(Y[b])] = softmax((40.0 * X[b] + T_BIAS).double().tolist(), 4.0)
    assert torch.allclose(distiller.prior.prior, torch.tensor(rows), atol=1e-6)
    out = distiller.loss(_ctx())
    assert out.total.item() == pytest.approx(4.0 * _hand_ikl(2.0, 5.0, 1.0, rows), rel=1e-5)


def test_ikl_without_wmse_trains_exactly_likekl() -> None:
    grads = []
    for config in (ARD.Config(alpha=0.7), ARD.Config(alpha=0.7, divergence="ikl", ikl_mse_weight=0.0)):
        ctx = _ctx()
        ARD(config, num_classes=4).loss(ctx).total.backward()
        grads.append(ctx.student.w.grad.item())
    assert grads[1] == pytest.approx(grads[0], rel=1e-6)
