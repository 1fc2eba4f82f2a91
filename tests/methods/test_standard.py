"""Numeric and protocol tests of the ``standard`` method (plain clean CE, no attack)."""

from __future__ import annotations

import pytest
import torch
from robustbench_kd_plugins import standard
from robustbench_kd_plugins.standard import Standard

from robustbench_kd.context import BatchContext
from robustbench_kd.errors import UserError
from robustbench_kd.registry import Registry
from robustbench_kd.testing import Affine, batch_context, cross_entropy
from robustbench_kd.threat import ThreatSpec


def _ctx() -> BatchContext:
    x = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.5, 0.0, 1.0], [0.7, 0.2, 0.4, 0.6]])
    return batch_context(x, torch.tensor([1, 3, 0]), student=Affine(2.0), threat=ThreatSpec())


def test_no_attack_and_no_teacher() -> None:
    assert Standard().attack_spec(ThreatSpec()) is None
    assert Standard.teacher_roles == ()
    assert Standard.name == "standard"


def test_loss_is_mean_cross_entropy_by_hand() -> None:
    ctx = _ctx()
    out = Standard(num_classes=4).loss(ctx)
    expected = sum(cross_entropy(2.0 * ctx.x[b], int(ctx.y[b])) for b in range(3)) / 3
    assert out.total.ndim == 0
    assert out.total.item() == pytest.approx(expected, rel=1e-6)
    assert set(out.terms) == {"ce"}
    assert not out.terms["ce"].requires_grad
    out.total.backward()
    assert ctx.student.w.grad is not None


def test_label_smoothing_option() -> None:
    ctx = _ctx()
    out = Standard(Standard.Config(label_smoothing=0.1)).loss(ctx)
    z = 2.0 * ctx.x
    ref = torch.nn.functional.cross_entropy(z, ctx.y, label_smoothing=0.1)
    assert out.total.item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(UserError):
        Standard.Config(label_smoothing=1.0)


def test_registration_and_config_mapping() -> None:
    registry = Registry("method")
    standard.rbkd_register_methods(registry.bound("standard"))
    assert registry.get("standard") is Standard
    with pytest.raises(UserError, match="label_smoothing"):
        Standard.config_from_mapping({"label_smothing": 0.1})
