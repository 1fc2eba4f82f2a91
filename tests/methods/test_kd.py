"""Numeric and protocol tests of ``kd`` (Hinton KD; CKD = kd at temperature 1)."""

from __future__ import annotations

import pytest
import torch
from robustbench_kd_plugins import kd
from robustbench_kd_plugins.kd import KD

from robustbench_kd.context import BatchContext
from robustbench_kd.errors import UserError
from robustbench_kd.registry import Registry
from robustbench_kd.testing import Affine, batch_context, cross_entropy, softmax
from robustbench_kd.testing import kl as kl_ref
from robustbench_kd.threat import ThreatSpec

X = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.5, 0.0, 1.0], [0.7, 0.2, 0.4, 0.6]])
Y = torch.tensor([1, 3, 0])
T_BIAS = torch.tensor([0.5, -1.0, 2.0, 0.0])


def _ctx() -> BatchContext:
    return batch_context(X, Y, student=Affine(3.0), teachers={"robust": Affine(5.0, T_BIAS)}, threat=ThreatSpec())


def _hand(tau: float) -> tuple[float, float]:
    """(mean CE at tau 1, batchmean KL(p_T^tau || p_S^tau)) on X."""
    ce = kl = 0.0
    for b in range(3):
        zs = (3.0 * X[b]).double().tolist()
        zt = (5.0 * X[b] + T_BIAS).double().tolist()
        ce += cross_entropy(zs, int(Y[b]))
        kl += kl_ref(softmax(zt, tau), softmax(zs, tau))
    return ce / 3, kl / 3


def test_no_attack() -> None:
    assert KD().attack_spec(ThreatSpec()) is None
    assert KD.teacher_roles == ("robust",)


def test_hinton_defaults_tau_squared_and_weights_by_hand() -> None:
    out = KD(num_classes=4).loss(_ctx())
    ce, kl = _hand(4.0)
    assert out.terms["kl_nat"].item() == pytest.approx(kl, rel=1e-5)
    assert out.terms["ce_nat"].item() == pytest.approx(ce, rel=1e-6)
    assert out.total.item() == pytest.approx(0.1 * ce + 0.9 * 16.0 * kl, rel=1e-5)


def test_without_tau_squared_and_other_reduction() -> None:
    ce, kl = _hand(4.0)
    out = KD(KD.Config(tau_squared=False)).loss(_ctx())
    assert out.total.item() == pytest.approx(0.1 * ce + 0.9 * kl, rel=1e-5)
    out = KD(KD.Config(kl_reduction="mean_all")).loss(_ctx())
    assert out.total.item() == pytest.approx(0.1 * ce + 0.9 * 16.0 * kl / 4, rel=1e-5)


def test_ckd_is_kd_at_temperature_one() -> None:
    lam = 0.7
    ce, kl = _hand(1.0)
    for tau_squared in (True, False):
        cfg = KD.Config(temperature=1.0, kd_weight=lam, ce_weight=1 - lam, tau_squared=tau_squared)
        out = KD(cfg).loss(_ctx())
        assert out.total.item() == pytest.approx((1 - lam) * ce + lam * kl, rel=1e-5)


def test_teacher_gets_no_gradient_student_does() -> None:
    ctx = _ctx()
    KD().loss(ctx).total.backward()
    assert ctx.student.w.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in ctx.teachers["robust"].parameters())


def test_registration_and_validation() -> None:
    registry = Registry("method")
    kd.rbkd_register_methods(registry.bound("kd"))
    assert registry.get("kd") is KD
    with pytest.raises(UserError):
        KD.Config(temperature=0.0)
    with pytest.raises(UserError):
        KD.Config(kd_weight=-0.1)
    with pytest.raises(UserError, match="valid options"):
        KD.config_from_mapping({"tau": 4})
