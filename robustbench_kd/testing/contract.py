"""The contract every method must satisfy, runnable by plugin authors on their own methods.

``check_distiller(MyMethod)`` trains one batch with tiny CPU models and asserts:

* the registry key is kebab-case and the class cites a paper;
* the attack keeps x' inside the eps-ball around x and inside [0,1], and ``attack_loss`` is a finite
  per-sample vector that is differentiable w.r.t. x';
* the loss is a finite scalar; after backward the student has gradients -- or the method's own
  trainable parameters do, and one optimiser step on them plus ``after_step`` changes the student;
* every teacher is unchanged, in eval mode, and received no parameter gradient;
* the student's train/eval mode is what it was before the attack.

Use it in a plugin's tests::

    from robustbench_kd.testing.contract import check_distiller
    def test_contract():
        check_distiller(MyMethod)
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from robustbench_kd.context import BatchContext
from robustbench_kd.distiller import Distiller, LossOutput
from robustbench_kd.teachers import Teacher, TeacherSet
from robustbench_kd.threat import ThreatSpec

_KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


class TinyNet(nn.Module):
    """A small conv net with BatchNorm on 1x8x8 inputs (BN makes train/eval mode matter)."""

    def __init__(self, num_classes: int = 4, width: int = 8, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            self.bn.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.mean(dim=(2, 3)))


def contract_batch(
    cls: type[Distiller], *, num_classes: int = 4, batch: int = 6, seed: int = 0, config: Any = None
) -> tuple[Distiller, BatchContext]:
    """A distiller of ``cls`` and a batch context with tiny student/teachers for every role it knows."""
    torch.manual_seed(seed)
    roles = (*cls.teacher_roles, *cls.optional_teacher_roles)
    teachers = TeacherSet(
        {role: Teacher(TinyNet(num_classes, seed=seed + 1 + i), spec=f"tiny:{role}") for i, role in enumerate(roles)}
    )
    student = TinyNet(num_classes, seed=seed + 100)
    x = torch.rand(batch, 1, 8, 8)
    y = torch.arange(batch) % num_classes
    threat = ThreatSpec(norm="Linf", eps=0.1, alpha=0.025, steps=3)
    distiller = cls(config, num_classes=num_classes)
    ctx = BatchContext(
        x=x, y=y, index=torch.arange(batch), student=student, teachers=teachers, threat=threat, epoch=0, num_epochs=2
    )
    return distiller, ctx


def check_distiller(
    cls: type[Distiller], *, config: Any = None, num_classes: int = 4, epoch: int = 0, host: Any = None
) -> LossOutput:
    """Run one training step of ``cls`` and assert the contract (see the module docstring).

    The attack is built through ``host.make_attack`` exactly as the trainer does, so an attack a
    plugin substitutes through ``rbkd_make_attack`` is checked too (default host: a fresh one with
    entry-point plugins loaded).
    """
    if host is None:
        from robustbench_kd.plugin_host import PluginHost

        host = PluginHost.create()
    assert isinstance(getattr(cls, "name", None), str) and _KEBAB.match(cls.name), (
        f"{cls.__name__}.name must be kebab-case, got {getattr(cls, 'name', None)!r}"
    )
    assert getattr(cls, "paper", "") or (cls.__doc__ or "").strip(), f"{cls.__name__} must cite its paper"
    distiller, ctx = contract_batch(cls, num_classes=num_classes, config=config)
    ctx.epoch = epoch
    student, threat = ctx.student, ctx.threat
    before = {role: copy.deepcopy(t.state_dict()) for role, t in ctx.teachers.items()}
    distiller.on_epoch_start(epoch, ctx.num_epochs)
    student.train()
    distiller.prepare(ctx)
    spec = distiller.attack_spec(threat)
    if spec is not None:
        x_probe = ctx.x.clone().requires_grad_(True)
        student.train(spec.student_mode == "train")  # probe in the mode the attack will use
        per_sample = distiller.attack_loss(ctx, x_probe)
        student.train()
        assert per_sample.shape == (len(ctx.y),), (
            f"{cls.name}: attack_loss must return one value per sample, got shape {tuple(per_sample.shape)}"
        )
        assert torch.isfinite(per_sample).all(), f"{cls.name}: attack_loss is not finite"
        (grad,) = torch.autograd.grad(per_sample.sum(), x_probe)
        assert torch.isfinite(grad).all(), f"{cls.name}: attack_loss gradient is not finite"
        student.zero_grad(set_to_none=True)
        attack = host.make_attack(
            distiller=distiller, student=student, spec=spec, loss_fn=lambda xa: distiller.attack_loss(ctx, xa)
        )
        ctx.x_adv = attack(ctx.x, ctx.y)
        assert student.training, f"{cls.name}: the attack left the student in eval mode"
        assert (ctx.x_adv - ctx.x).abs().max() <= spec.eps + 1e-6, f"{cls.name}: x' left the eps-ball"
        assert ctx.x_adv.min() >= 0 and ctx.x_adv.max() <= 1, f"{cls.name}: x' left [0,1]"
        assert not ctx.x_adv.requires_grad, f"{cls.name}: x' must be detached"
    student.zero_grad(set_to_none=True)
    out = distiller.loss(ctx)
    assert isinstance(out, LossOutput), f"{cls.name}: loss() must return a LossOutput"
    assert out.total.ndim == 0, f"{cls.name}: total loss must be a scalar, got shape {tuple(out.total.shape)}"
    assert torch.isfinite(out.total), f"{cls.name}: total loss is not finite ({out.total})"
    for name, term in out.terms.items():
        assert not term.requires_grad, f"{cls.name}: logged term {name!r} must be detached"
    out.total.backward()
    student_learns = any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    own = [p for p in distiller.trainable_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert student_learns or own, f"{cls.name}: neither the student nor the method's parameters received a gradient"
    for role, teacher in ctx.teachers.items():
        assert not teacher.training, f"{cls.name}: teacher {role!r} left eval mode"
        for pname, p in teacher.named_parameters():
            assert p.grad is None, f"{cls.name}: teacher {role!r} parameter {pname} received a gradient"
            assert not p.requires_grad, f"{cls.name}: teacher {role!r} parameter {pname} requires grad"
        after = teacher.state_dict()
        for key, value in before[role].items():
            assert torch.equal(value, after[key]), f"{cls.name}: teacher {role!r} changed ({key})"
    if student_learns:
        distiller.after_step(ctx, out)
    else:
        # The method trains its own parameters and writes them into the student in after_step (e.g. a
        # preconditioned classifier): one optimiser step on them must change the student.
        weights = copy.deepcopy(student.state_dict())
        torch.optim.SGD(own, lr=0.1).step()
        distiller.after_step(ctx, out)
        assert any(not torch.equal(v, student.state_dict()[k]) for k, v in weights.items()), (
            f"{cls.name}: the student received no gradient and after_step did not update it either"
        )
    distiller.on_epoch_end(epoch, ctx.num_epochs)
    return out
