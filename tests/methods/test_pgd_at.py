"""Numeric and protocol tests of ``pgd-at`` (Madry PGD-AT and the fast FGSM-RS variant)."""

from __future__ import annotations

import pluggy
import pytest
import torch
from robustbench_kd_plugins import attack as builtin_attack
from robustbench_kd_plugins import pgd_at
from robustbench_kd_plugins.pgd_at import PGDAT
from torch import nn

from robustbench_kd import hookspecs
from robustbench_kd.attacks import DistillationAttack
from robustbench_kd.context import BatchContext
from robustbench_kd.errors import UserError
from robustbench_kd.registry import Registry
from robustbench_kd.teachers import TeacherSet
from robustbench_kd.testing import Affine, TinyNet, batch_context, cross_entropy
from robustbench_kd.threat import ThreatSpec

THREAT = ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=10)


def _ce_by_hand(z: torch.Tensor, y: torch.Tensor) -> list[float]:
    return [cross_entropy(z[b], int(y[b])) for b in range(z.shape[0])]


def _ctx(student: nn.Module | None = None) -> BatchContext:
    x = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.5, 0.0, 1.0], [0.7, 0.2, 0.4, 0.6]])
    x_adv = torch.tensor([[0.9, 0.1, 0.3, 0.2], [0.5, 0.6, 0.8, 0.0], [0.1, 0.2, 0.9, 0.6]])
    return batch_context(x, torch.tensor([1, 3, 0]), student=student or Affine(3.0), x_adv=x_adv, threat=THREAT)


def test_attack_spec_defaults_follow_threat() -> None:
    spec = PGDAT().attack_spec(THREAT)
    assert spec is not None
    assert (spec.eps, spec.alpha, spec.steps) == (THREAT.eps, THREAT.alpha, 10)
    assert spec.init == "uniform"
    assert spec.student_mode == "eval"
    assert spec.norm == "Linf"
    assert PGDAT(PGDAT.Config(steps=7)).attack_spec(THREAT).steps == 7
    train = PGDAT(PGDAT.Config(attack_student_mode="train")).attack_spec(THREAT)
    assert train.student_mode == "train"


def test_fast_attack_spec_is_single_step_uniform() -> None:
    distiller = PGDAT(PGDAT.Config(fast=True))
    spec = distiller.attack_spec(THREAT)
    assert spec.steps == 1
    assert spec.init == "uniform"
    assert spec.alpha == pytest.approx(1.25 * THREAT.eps) and spec.large_step
    assert distiller.fast_step_size(THREAT.eps) == pytest.approx(1.25 * THREAT.eps)
    small = PGDAT(PGDAT.Config(fast=True, fast_step_factor=0.5)).attack_spec(THREAT)
    assert small.alpha == pytest.approx(0.5 * THREAT.eps)


def test_loss_is_ce_on_adversarial_batch_by_hand() -> None:
    ctx = _ctx()
    out = PGDAT().loss(ctx)
    expected = sum(_ce_by_hand(3.0 * ctx.x_adv, ctx.y)) / 3
    assert out.total.item() == pytest.approx(expected, rel=1e-6)
    assert set(out.terms) == {"ce_adv"}
    assert ctx.student.calls == 1  # no clean forward when clean_weight == 0


def test_clean_mixture_weight() -> None:
    ctx = _ctx()
    out = PGDAT(PGDAT.Config(clean_weight=0.3)).loss(ctx)
    adv = sum(_ce_by_hand(3.0 * ctx.x_adv, ctx.y)) / 3
    nat = sum(_ce_by_hand(3.0 * ctx.x, ctx.y)) / 3
    assert out.total.item() == pytest.approx(0.3 * nat + 0.7 * adv, rel=1e-6)
    assert out.terms["ce_nat"].item() == pytest.approx(nat, rel=1e-6)
    assert ctx.student.calls == 2


def test_attack_loss_is_per_sample_ce() -> None:
    ctx = _ctx()
    per_sample = PGDAT().attack_loss(ctx, ctx.x_adv)
    assert per_sample.shape == (3,)
    assert per_sample.tolist() == pytest.approx(_ce_by_hand(3.0 * ctx.x_adv, ctx.y), rel=1e-6)


def test_config_validation() -> None:
    with pytest.raises(UserError):
        PGDAT.Config(clean_weight=1.5)
    with pytest.raises(UserError):
        PGDAT.Config(init="normal")
    with pytest.raises(UserError):
        PGDAT.Config(fast=True, steps=3)
    with pytest.raises(UserError, match="valid options"):
        PGDAT.config_from_mapping({"stepz": 3})


def _plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("robustbench_kd")
    pm.add_hookspecs(hookspecs)
    pm.register(builtin_attack, name="attack")
    pm.register(pgd_at, name="pgd-at")
    return pm


def test_fast_spec_is_fgsm_rs_with_a_step_above_eps() -> None:
    pm = _plugin_manager()
    student = Affine(1.0)
    loss_fn = lambda xa: xa.sum(dim=1)  # noqa: E731
    fast = PGDAT(PGDAT.Config(fast=True))
    spec = fast.attack_spec(THREAT)
    assert spec.large_step and spec.steps == 1 and spec.init == "uniform"
    atk = pm.hook.rbkd_make_attack(distiller=fast, student=student, spec=spec, loss_fn=loss_fn)
    assert atk.alpha == pytest.approx(1.25 * THREAT.eps)
    assert atk.steps == 1
    plain = PGDAT()
    atk = pm.hook.rbkd_make_attack(distiller=plain, student=student, spec=plain.attack_spec(THREAT), loss_fn=loss_fn)
    assert type(atk) is DistillationAttack
    assert atk.steps == 10


def test_fgsm_rs_takes_a_step_larger_than_eps() -> None:
    torch.manual_seed(0)
    eps = 0.1
    x = torch.full((64, 16), 0.5)
    direction = torch.where(torch.arange(16) % 2 == 0, 1.0, -1.0)
    loss_fn = lambda xa: (xa * direction).sum(dim=1)  # noqa: E731  gradient sign == direction
    student = Affine(1.0, num_classes=16)
    fast = DistillationAttack(student, loss_fn, eps=eps, alpha=1.25 * eps, steps=1, allow_large_step=True)(
        x, torch.zeros(64, dtype=torch.long)
    )
    moved = (fast - x) * direction
    assert moved.max() <= eps + 1e-6
    assert moved.min() >= 0.25 * eps - 1e-6  # any start in [-eps, eps] plus 1.25 eps
    torch.manual_seed(0)
    pgd1 = DistillationAttack(student, loss_fn, eps=eps, alpha=eps, steps=1)(x, torch.zeros(64, dtype=torch.long))
    assert ((pgd1 - x) * direction).min() < 0.25 * eps  # a step of eps does not guarantee that


@pytest.mark.parametrize("config", [PGDAT.Config(), PGDAT.Config(fast=True), PGDAT.Config(clean_weight=0.5)])
def test_end_to_end_batch(config: PGDAT.Config) -> None:
    torch.manual_seed(0)
    student = TinyNet(10).train()
    distiller = PGDAT(config)
    threat = ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=2)
    ctx = BatchContext(
        x=torch.rand(4, 1, 8, 8), y=torch.randint(0, 10, (4,)), student=student, teachers=TeacherSet(), threat=threat
    )
    distiller.prepare(ctx)
    spec = distiller.attack_spec(threat)
    atk = _plugin_manager().hook.rbkd_make_attack(
        distiller=distiller, student=student, spec=spec, loss_fn=lambda xa: distiller.attack_loss(ctx, xa)
    )
    ctx.x_adv = atk(ctx.x, ctx.y)
    assert student.training and student.bn.training
    assert (ctx.x_adv - ctx.x).abs().max() <= threat.eps + 1e-6
    assert ctx.x_adv.min() >= 0 and ctx.x_adv.max() <= 1
    out = distiller.loss(ctx)
    assert out.total.ndim == 0 and torch.isfinite(out.total)
    out.total.backward()
    assert all(p.grad is not None for p in student.parameters())


def test_registration() -> None:
    registry = Registry("method")
    pgd_at.rbkd_register_methods(registry.bound("pgd-at"))
    assert registry.get("pgd-at") is PGDAT
    assert PGDAT.teacher_roles == ()
    assert "Madry" in PGDAT.paper and "1706.06083" in PGDAT.paper
