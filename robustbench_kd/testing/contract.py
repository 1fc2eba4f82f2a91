"""The contract every method must satisfy, runnable by plugin authors on their own methods.

``check_distiller(MyMethod)`` runs what training runs, in the trainer's order and through the trainer's
own set-up code, on tiny CPU models (a few hundred milliseconds):

1. the class: the registry key is kebab-case and the class cites a paper;
2. set-up (:func:`robustbench_kd.training.setup.assemble_run`): the method is built from its options,
   ``on_setup`` sees the real student and teachers, the optimiser and scheduler are built by the
   trainer's code, then ``on_train_start``;
3. two epochs of two batches (``on_epoch_start``, per batch ``prepare``, attack, ``loss``, backward,
   optimiser step, ``after_step``; ``on_epoch_end``), asserting at every batch:

   * the attack keeps x' inside the eps-ball around x and inside [0,1], ``attack_loss`` is a finite
     per-sample vector differentiable w.r.t. x', and the student's train/eval mode is restored;
   * the loss is a finite scalar with detached logged terms;
   * **every parameter that received a gradient is in the optimiser** (a network the method creates
     after ``on_setup``, e.g. lazily in ``loss``, would never train), found through the autograd graph, so
     a network kept outside the distiller's attributes is caught too;
   * the student changes (through its gradient, or the method's own parameters and ``after_step``);
   * every teacher is unchanged, in eval mode, and received no parameter gradient;

4. a resume: ``state_dict()`` and ``method_state()`` go through a real checkpoint file (loaded with
   ``weights_only=True``, as ``--resume`` does) into a FRESH instance set up the same way, strictly
   (missing or unexpected keys fail); the optimiser state loads; after ``on_train_start`` the state
   still equals the saved one; and the next training step gives the same loss and the same weights
   in the original and in the resumed method.

Use it in a plugin's tests::

    from robustbench_kd.testing.contract import check_distiller
    def test_contract():
        check_distiller(MyMethod)
"""

from __future__ import annotations

import copy
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustbench_kd.config import config_from_mapping
from robustbench_kd.context import BatchContext
from robustbench_kd.data.datasets import DataSplits
from robustbench_kd.distiller import Distiller, LossOutput
from robustbench_kd.storage.checkpoint import load_checkpoint, save_checkpoint
from robustbench_kd.teachers import Teacher, TeacherSet
from robustbench_kd.testing.stubs import set_up
from robustbench_kd.threat import ThreatSpec
from robustbench_kd.training.checkpoints import restore_method
from robustbench_kd.training.setup import Run, assemble_run

_KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
#: the contract's world: 1x8x8 images, 4 classes, batches of 6, two epochs of two batches, then one more step
IMAGE = (1, 8, 8)
BATCH = 6
BATCHES_PER_EPOCH = 2
EPOCHS_CHECKED = 2
THREAT = ThreatSpec(norm="Linf", eps=0.1, alpha=0.025, steps=3)


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


def _fresh_tiny_net(num_classes: int) -> nn.Module:
    """What ``SetupContext.new_student()`` builds in the contract: a TinyNet seeded from the global RNG."""
    return TinyNet(num_classes, seed=int(torch.randint(0, 2**31 - 1, ())))


def _tiny_teachers(cls: type[Distiller], num_classes: int, seed: int) -> TeacherSet:
    roles = (*cls.teacher_roles, *cls.optional_teacher_roles)
    return TeacherSet(
        {role: Teacher(TinyNet(num_classes, seed=seed + 1 + i), spec=f"tiny:{role}") for i, role in enumerate(roles)}
    )


def contract_batch(
    cls: type[Distiller], *, num_classes: int = 4, batch: int = 6, seed: int = 0, config: Any = None
) -> tuple[Distiller, BatchContext]:
    """A set-up distiller of ``cls`` and a batch context with tiny student/teachers for every role it knows."""
    torch.manual_seed(seed)
    teachers = _tiny_teachers(cls, num_classes, seed)
    student = TinyNet(num_classes, seed=seed + 100)
    x = torch.rand(batch, *IMAGE)
    y = torch.arange(batch) % num_classes
    distiller = cls(config, num_classes=num_classes)
    ctx = BatchContext(
        x=x, y=y, index=torch.arange(batch), student=student, teachers=teachers, threat=THREAT, epoch=0, num_epochs=2
    )
    return set_up(distiller, ctx), ctx


def check_distiller(
    cls: type[Distiller], *, config: Any = None, num_classes: int = 4, epoch: int = 0, host: Any = None
) -> LossOutput:
    """Run ``cls`` as training does and assert the contract (see the module docstring).

    Args:
        config: the method's Config (default: its defaults).
        epoch: the first epoch index the contract trains (methods whose behaviour starts at a later epoch,
            e.g. after a warm-up, are checked from there); the run has ``epoch + 3`` epochs.
        host: the plugin host whose ``make_attack`` builds the attack exactly as the trainer's does, so an
            attack a plugin substitutes through ``rbkd_make_attack`` is checked too (default: a fresh host
            with entry-point plugins loaded).

    Returns:
        the loss of the first step.
    """
    if host is None:
        from robustbench_kd.plugin_host import PluginHost

        host = PluginHost.create()
    assert isinstance(getattr(cls, "name", None), str) and _KEBAB.match(cls.name), (
        f"{cls.__name__}.name must be kebab-case, got {getattr(cls, 'name', None)!r}"
    )
    assert getattr(cls, "paper", "") or (cls.__doc__ or "").strip(), f"{cls.__name__} must cite its paper"
    world = _ContractWorld(cls, config=config, num_classes=num_classes, first_epoch=epoch, host=host)
    run = world.set_up(cls(config, num_classes=num_classes), TinyNet(num_classes, seed=100))
    run.distiller.on_train_start(run)
    first: LossOutput | None = None
    for e in range(epoch, epoch + EPOCHS_CHECKED):
        run.distiller.on_epoch_start(e, world.num_epochs)
        for step in range(BATCHES_PER_EPOCH):
            out = _checked_step(run, world.batch(e, step), host)
            first = first or out
        metrics = run.distiller.on_epoch_end(e, world.num_epochs)
        assert isinstance(metrics, Mapping), f"{cls.name}: on_epoch_end must return a dict of metrics"
    _check_resume(world, run)
    assert first is not None
    return first


class _ContractWorld:
    """Tiny data, networks and run configuration for one contract check; builds runs through the trainer's code."""

    def __init__(self, cls: type[Distiller], *, config: Any, num_classes: int, first_epoch: int, host: Any) -> None:
        self.cls, self.config, self.num_classes, self.host = cls, config, num_classes, host
        self.num_epochs = first_epoch + EPOCHS_CHECKED + 1
        gen = torch.Generator().manual_seed(0)  # the first batch is contract_batch's
        n = BATCH * BATCHES_PER_EPOCH
        labels = torch.arange(n) % num_classes
        self.data = DataSplits(
            name="contract",
            train_x=torch.rand((n, *IMAGE), generator=gen),
            train_y=labels,
            test_x=torch.rand((BATCH, *IMAGE), generator=gen),
            test_y=labels[:BATCH],
            num_classes=num_classes,
        )
        self.run_config = config_from_mapping(
            {
                "run": {"device": "cpu", "seed": 0, "progress": False, "out_dir": "contract-run-never-written"},
                "data": {"batch_size": BATCH},
                "threat": {"norm": THREAT.norm, "eps": THREAT.eps, "alpha": THREAT.alpha, "steps": THREAT.steps},
                "method": {"name": cls.name},
                "optim": {
                    "epochs": self.num_epochs,
                    "lr": 0.05,
                    "schedule": "multistep",
                    "milestones": [self.num_epochs - 1],
                },
            }
        )
        self.teachers = _tiny_teachers(cls, num_classes, seed=0)

    def set_up(self, distiller: Distiller, student: nn.Module) -> Run:
        torch.manual_seed(0)
        return assemble_run(
            self.run_config,
            self.host,
            self.data,
            distiller,
            student,
            self.teachers,
            torch.device("cpu"),
            lambda: _fresh_tiny_net(self.num_classes),
        )

    def batch(self, epoch: int, step: int) -> BatchContext:
        rows = slice(step * BATCH, (step + 1) * BATCH)
        index = torch.arange(len(self.data.train_y))[rows]
        return BatchContext(
            x=self.data.train_x[rows],
            y=self.data.train_y[rows],
            index=index,
            student=nn.Identity(),  # replaced by the run's student in _checked_step
            teachers=self.teachers,
            threat=THREAT,
            epoch=epoch,
            num_epochs=self.num_epochs,
            step=step,
            global_step=epoch * BATCHES_PER_EPOCH + step,
        )


def _checked_step(run: Run, ctx: BatchContext, host: Any, *, seed: int | None = None) -> LossOutput:
    """One training step as :func:`robustbench_kd.training.step.train_step` runs it, with the per-batch assertions."""
    distiller, student = run.distiller, run.student
    name = distiller.name
    ctx.student = student
    if seed is not None:
        torch.manual_seed(seed)
    before = {role: copy.deepcopy(t.state_dict()) for role, t in ctx.teachers.items()}
    student.train()
    distiller.prepare(ctx)
    spec = distiller.attack_spec(ctx.threat)
    if spec is not None:
        x_probe = ctx.x.clone().requires_grad_(True)
        student.train(spec.student_mode == "train")  # probe in the mode the attack will use
        per_sample = distiller.attack_loss(ctx, x_probe)
        student.train()
        assert per_sample.shape == (len(ctx.y),), (
            f"{name}: attack_loss must return one value per sample, got shape {tuple(per_sample.shape)}"
        )
        assert torch.isfinite(per_sample).all(), f"{name}: attack_loss is not finite"
        (grad,) = torch.autograd.grad(per_sample.sum(), x_probe)
        assert torch.isfinite(grad).all(), f"{name}: attack_loss gradient is not finite"
        student.zero_grad(set_to_none=True)
        if seed is not None:
            torch.manual_seed(seed)
        attack = host.make_attack(
            distiller=distiller, student=student, spec=spec, loss_fn=lambda xa: distiller.attack_loss(ctx, xa)
        )
        ctx.x_adv = attack(ctx.x, ctx.y)
        assert student.training, f"{name}: the attack left the student in eval mode"
        assert (ctx.x_adv - ctx.x).abs().max() <= spec.eps + 1e-6, f"{name}: x' left the eps-ball"
        assert ctx.x_adv.min() >= 0 and ctx.x_adv.max() <= 1, f"{name}: x' left [0,1]"
        assert not ctx.x_adv.requires_grad, f"{name}: x' must be detached"
    run.optimizer.zero_grad(set_to_none=True)
    out = distiller.loss(ctx)
    assert isinstance(out, LossOutput), f"{name}: loss() must return a LossOutput"
    assert out.total.ndim == 0, f"{name}: total loss must be a scalar, got shape {tuple(out.total.shape)}"
    assert torch.isfinite(out.total), f"{name}: total loss is not finite ({out.total})"
    for term_name, term in out.terms.items():
        assert not term.requires_grad, f"{name}: logged term {term_name!r} must be detached"
    leaves = list(_graph_leaves(out.total))
    out.total.backward()
    _assert_gradients_are_optimised(run, leaves)
    student_learns = any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    own = [p for p in distiller.trainable_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert student_learns or own, f"{name}: neither the student nor the method's parameters received a gradient"
    for role, teacher in ctx.teachers.items():
        assert not teacher.training, f"{name}: teacher {role!r} left eval mode"
        for pname, p in teacher.named_parameters():
            assert p.grad is None, f"{name}: teacher {role!r} parameter {pname} received a gradient"
            assert not p.requires_grad, f"{name}: teacher {role!r} parameter {pname} requires grad"
        after = teacher.state_dict()
        for key, value in before[role].items():
            assert torch.equal(value, after[key]), f"{name}: teacher {role!r} changed ({key})"
    weights = copy.deepcopy(student.state_dict())
    run.optimizer.step()
    distiller.after_step(ctx, out)
    # A method that trains only its own parameters must write them into the student in after_step.
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in weights.items()), (
        f"{name}: the training step changed nothing in the student (no gradient reached it and after_step "
        "did not update it)"
    )
    return out


def _graph_leaves(total: Tensor) -> Iterator[Tensor]:
    """Every leaf tensor the loss back-propagates into (the ``AccumulateGrad`` nodes of its graph)."""
    seen: set[int] = set()
    stack = [total.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            yield variable
        stack.extend(next_node for next_node, _ in node.next_functions)


def _assert_gradients_are_optimised(run: Run, leaves: list[Tensor]) -> None:
    """Fail, naming them, when parameters that received a gradient are not in the optimiser."""
    optimised = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    names = {id(p): f"student.{n}" for n, p in run.student.named_parameters()}
    names.update({id(p): n for n, p in run.distiller.named_parameters()})
    outside = [
        names.get(id(t), f"a tensor of shape {tuple(t.shape)} held outside the distiller's attributes")
        for t in leaves
        if id(t) not in optimised and t.grad is not None and t.grad.abs().sum() > 0
    ]
    assert not outside, (
        f"{run.distiller.name}: parameters received a gradient but are not in the optimiser: "
        f"{', '.join(sorted(set(outside)))}. The optimiser is built after on_setup() from the student and "
        "trainable_parameters(): create the method's networks in on_setup() (setup.new_student() builds one "
        "like the student), as attributes of the distiller, not later (e.g. lazily in loss())"
    )


def _check_resume(world: _ContractWorld, run: Run) -> None:
    """Save, resume into a fresh instance through a real checkpoint file, and take the next step in both."""
    name = run.distiller.name
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "last.pt"
        save_checkpoint(
            path,
            {
                "student": run.student.state_dict(),
                "distiller": run.distiller.state_dict(),
                "method_state": run.distiller.method_state(),
                "optimizer": run.optimizer.state_dict(),
            },
        )
        saved = load_checkpoint(path)  # weights_only=True, as --resume
    fresh = world.cls(world.config, num_classes=world.num_classes)
    student = TinyNet(world.num_classes, seed=100)
    student.load_state_dict(saved["student"])
    resumed = world.set_up(fresh, student)
    try:
        restore_method(resumed, saved["distiller"], saved["method_state"], source="the contract's checkpoint")
    except Exception as exc:
        raise AssertionError(f"{name}: a fresh instance cannot load the saved state: {exc}") from exc
    resumed.optimizer.load_state_dict(saved["optimizer"])
    fresh.on_train_start(resumed)
    restored = fresh.state_dict()
    for key, value in saved["distiller"].items():
        assert key in restored and _same(value, restored[key]), (
            f"{name}: state {key!r} differs after resuming and on_train_start (on_train_start must keep "
            "restored state; a value it derives must be saved)"
        )
    _assert_same_state(name, run.distiller.method_state(), fresh.method_state())
    last = world.num_epochs - 1
    outs = []
    for r in (run, resumed):
        r.distiller.on_epoch_start(last, world.num_epochs)
        outs.append(_checked_step(r, world.batch(last, 0), world.host, seed=1234))
    before, after = (float(out.total.detach()) for out in outs)
    assert torch.equal(outs[0].total.detach(), outs[1].total.detach()), (
        f"{name}: after a resume the next step's loss differs ({before} vs {after}): "
        "some state is neither in state_dict() nor in method_state()"
    )
    for (key, a), b in zip(run.student.state_dict().items(), resumed.student.state_dict().values(), strict=True):
        assert _same(a, b), f"{name}: after a resume the next step trains the student differently ({key})"
    for (key, a), b in zip(run.distiller.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert _same(a, b), f"{name}: after a resume the next step changes the method's state differently ({key})"


def _same(a: Any, b: Any) -> bool:
    """Bitwise equality of state values; NaN equals NaN (an "unset" marker some methods keep)."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point():
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return bool(torch.equal(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return bool(a == b)


def _assert_same_state(name: str, a: Any, b: Any, where: str = "method_state()") -> None:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        assert set(a) == set(b), f"{name}: {where} keys differ after a resume: {sorted(a)} vs {sorted(b)}"
        for key in a:
            _assert_same_state(name, a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), f"{name}: {where} differs after a resume"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(name, x, y, f"{where}[{i}]")
    else:
        assert _same(a, b), f"{name}: {where} differs after a resume: {a!r} vs {b!r}"
