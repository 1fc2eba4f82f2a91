"""Numeric and protocol tests of ``ard``."""

from __future__ import annotations

import math

import pytest
import torch
from robustbench_kd_plugins import ard
from robustbench_kd_plugins.ard import ARD
from torch import nn

from robustbench_kd.attacks import DistillationAttack
from robustbench_kd.context import BatchContext
from robustbench_kd.errors import UserError
from robustbench_kd.registry import Registry
from robustbench_kd.teachers import Teacher, TeacherSet
from robustbench_kd.testing import check_distiller
from robustbench_kd.threat import ThreatSpec

THREAT = ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=10)
X = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.5, 0.0, 1.0], [0.7, 0.2, 0.4, 0.6]])
X_ADV = torch.tensor([[0.9, 0.1, 0.3, 0.2], [0.5, 0.6, 0.8, 0.0], [0.1, 0.2, 0.9, 0.6]])
Y = torch.tensor([1, 3, 0])
T_BIAS = torch.tensor([0.5, -1.0, 2.0, 0.0])


class Scale(nn.Module):
    """Stub network: logits = w * x + bias; counts its forward passes."""

    def __init__(self, w: float, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.register_buffer("bias", torch.zeros(4) if bias is None else bias.clone())
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.w * x + self.bias


def _softmax(row: list[float], tau: float = 1.0) -> list[float]:
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def _ce(row: list[float], y: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[y]


def _ctx() -> BatchContext:
    # Teacher scale 40 so that its tau = 30 distribution is far from uniform.
    teacher = Teacher(Scale(40.0, T_BIAS))
    ctx = BatchContext(x=X.clone(), y=Y.clone(), student=Scale(30.0), teachers=TeacherSet({"robust": teacher}),
                       threat=THREAT)
    ctx.x_adv = X_ADV.clone()
    return ctx


def _hand(tau: float) -> tuple[float, float]:
    """(batchmean KL(p_T^tau(x) || p_S^tau(x')), mean CE(z_S(x), y))."""
    kl = ce = 0.0
    for b in range(3):
        zt = (40.0 * X[b] + T_BIAS).double().tolist()  # teacher on CLEAN x
        zs_adv = (30.0 * X_ADV[b]).double().tolist()
        zs_nat = (30.0 * X[b]).double().tolist()
        kl += _kl(_softmax(zt, tau), _softmax(zs_adv, tau))
        ce += _ce(zs_nat, int(Y[b]))
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


def test_attack_loss_is_per_sample_ce() -> None:
    ctx = _ctx()
    got = ARD().attack_loss(ctx, X_ADV)
    assert got.tolist() == pytest.approx([_ce((30.0 * X_ADV[b]).double().tolist(), int(Y[b])) for b in range(3)],
                                         rel=1e-6)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_end_to_end_batch_attack_in_train_mode_updates_bn() -> None:
    torch.manual_seed(0)
    student, teacher = TinyNet().train(), Teacher(TinyNet())
    distiller = ARD()
    threat = ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=3)
    ctx = BatchContext(x=torch.rand(4, 3, 8, 8), y=torch.randint(0, 10, (4,)), student=student,
                       teachers=TeacherSet({"robust": teacher}), threat=threat)
    distiller.prepare(ctx)
    spec = distiller.attack_spec(threat)
    bn = student.body[1]
    tracked = int(bn.num_batches_tracked)
    atk = DistillationAttack(student, lambda xa: distiller.attack_loss(ctx, xa), eps=spec.eps, alpha=spec.alpha,
                             steps=spec.steps, init=spec.init, student_mode=spec.student_mode)
    ctx.x_adv = atk(ctx.x, ctx.y)
    assert int(bn.num_batches_tracked) == tracked + 3  # batch statistics at every attack step
    assert student.training
    assert (ctx.x_adv - ctx.x).abs().max() <= threat.eps + 1e-6
    out = distiller.loss(ctx)
    assert torch.isfinite(out.total) and out.total.ndim == 0
    out.total.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_registration_and_validation() -> None:
    registry = Registry("method")
    ard.rbkd_register_methods(registry.bound("ard"))
    assert registry.get("ard") is ARD
    assert ARD.teacher_roles == ("robust",)
    with pytest.raises(UserError):
        ARD.Config(alpha=1.1)
    with pytest.raises(UserError):
        ARD.Config(attack_student_mode="training")


def test_contract() -> None:
    check_distiller(ARD)
    check_distiller(ARD, config=ARD.Config(alpha=0.5))
    check_distiller(ARD, config=ARD.Config(clean_forward_when_unused=False))


# -- IKL in place of the KL (divergence="ikl", methods.md §10.4) ----------------------------------
def _wmse(o_t: list[float], o_l: list[float], s: list[float]) -> float:
    c = len(o_t)
    return 0.25 * sum(s[j] * s[k] * ((o_t[j] - o_t[k]) - (o_l[j] - o_l[k])) ** 2 for j in range(c) for k in range(c))


def _hand_ikl(tau: float, mse_w: float, sce_w: float, rows: list[list[float]] | None = None) -> float:
    """batchmean of mse_w * wMSE(z_T(x)/tau, z_S(x')/tau) + sce_w * sCE(p_T^tau(x) -> p_S^tau(x'))."""
    rows = rows or [[0.25] * 4] * 4
    total = 0.0
    for b in range(3):
        zt = [v / tau for v in (40.0 * X[b] + T_BIAS).double().tolist()]
        zs = [v / tau for v in (30.0 * X_ADV[b]).double().tolist()]
        q, p = _softmax(zt), _softmax(zs)
        sce = -sum(qi * math.log(pi) for qi, pi in zip(q, p, strict=True))
        total += mse_w * _wmse(zt, zs, rows[int(Y[b])]) + sce_w * sce
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
        rows[int(Y[b])] = _softmax((40.0 * X[b] + T_BIAS).double().tolist(), 4.0)
    assert torch.allclose(distiller.prior.prior, torch.tensor(rows), atol=1e-6)
    out = distiller.loss(_ctx())
    assert out.total.item() == pytest.approx(4.0 * _hand_ikl(2.0, 5.0, 1.0, rows), rel=1e-5)


def test_ikl_without_wmse_trains_exactly_like_kl() -> None:
    grads = []
    for config in (ARD.Config(alpha=0.7), ARD.Config(alpha=0.7, divergence="ikl", ikl_mse_weight=0.0)):
        ctx = _ctx()
        ARD(config, num_classes=4).loss(ctx).total.backward()
        grads.append(ctx.student.w.grad.item())
    assert grads[1] == pytest.approx(grads[0], rel=1e-6)


def test_contract_ikl() -> None:
    check_distiller(ARD, config=ARD.Config(divergence="ikl"))
    check_distiller(ARD, config=ARD.Config(divergence="ikl", ikl_class_prior=False, alpha=0.5))
