"""What a method sees: :class:`SetupContext` once before training, :class:`BatchContext` per batch.

Teacher outputs are memoised per batch (computed once, without gradients, in eval mode), because
several places need them: a method's ``prepare``, every attack step, and the outer loss. Student
outputs are never memoised: the student runs in different BN modes and with different gradient
needs in the attack and in the loss.

Under torchrun the outer loss runs through the DistributedDataParallel wrapper of the student and
everything else (``prepare``, the attack, ``after_step``, observers) on the plain student. The step
therefore hands ``distiller.loss`` a second context, :meth:`BatchContext.with_student`, that shares this
batch's tensors, teacher memo, ``x_adv`` and ``extras`` and differs only in ``student``; one context is
never switched from one network to the other.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from robustbench_kd.teachers import TeacherSet
from robustbench_kd.threat import ThreatSpec

_ABSENT = object()


@dataclass(frozen=True)
class SetupContext:
    """The run's real networks and the data's shape, given once to :meth:`Distiller.on_setup`.

    The trainer builds it after the student and the teachers exist and before the optimiser is built or
    a resume loads the method's state, so a network the method creates there joins the optimiser and is
    restored by ``--resume`` like any other parameter of the method.

    Attributes:
        student: the student being trained, on ``device`` (``student.init_from`` loaded; not yet wrapped
            for DDP or compiled).
        teachers: the frozen teachers by role, in eval mode.
        num_classes, in_channels, image_size: the shape of the data (images are
            ``in_channels x image_size x image_size`` in [0, 1]).
        device: the training device.
        seed: ``run.seed``, for anything the method draws at random.
        student_factory: builds a freshly initialised network of the student's architecture and
            options (through the student registry); use :meth:`new_student`.
    """

    student: nn.Module
    teachers: TeacherSet
    num_classes: int
    in_channels: int
    image_size: int
    device: torch.device
    student_factory: Callable[[], nn.Module]
    seed: int = 0

    def new_student(self) -> nn.Module:
        """A new network like the student: same architecture and options, fresh weights, on ``device``.

        Its weights come from the global RNG, which the trainer seeds with ``run.seed`` before set-up, so
        two runs of one configuration start from the same network. It is in train mode.
        """
        return self.student_factory().to(self.device).train()

    def example_input(self, batch_size: int = 2) -> Tensor:
        """A constant batch of the data's shape on ``device`` (to measure feature sizes with a forward pass)."""
        return torch.full((batch_size, self.in_channels, self.image_size, self.image_size), 0.5, device=self.device)


@dataclass
class BatchContext:
    """Everything a method sees for one batch.

    Attributes:
        x: clean inputs in [0,1], on the training device.
        y: int64 labels.
        index: dataset indices of the samples (for per-sample state), or None.
        student: the network this phase of the step calls: the student being trained (its compiled view
            under ``speed.compile``); in ``distiller.loss`` under torchrun, its DDP wrapper.
        teachers: teachers by role.
        threat: the run's threat model.
        epoch, num_epochs: 0-based epoch and total epochs.
        step: batch index within the epoch; global_step: batches since the start of training.
        extras: free-form per-batch values a dataset or plugin adds.
    """

    x: Tensor
    y: Tensor
    student: nn.Module
    teachers: TeacherSet
    threat: ThreatSpec
    index: Tensor | None = None
    epoch: int = 0
    num_epochs: int = 1
    step: int = 0
    global_step: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    _x_adv: Tensor | None = field(default=None, repr=False)
    _memo: dict[tuple[str, str], Tensor] = field(default_factory=dict, repr=False)  # (role, on) -> logits
    _probs: dict[tuple[str, str, float], Tensor] = field(default_factory=dict, repr=False)  # + temperature

    def with_student(self, student: nn.Module) -> BatchContext:
        """This batch with ``student`` as the network: a second context sharing the tensors, the teacher
        memo, ``x_adv`` and ``extras`` (the same objects, not copies). The step gives it to
        ``distiller.loss`` under torchrun, with the DDP wrapper as ``student``."""
        view = copy.copy(self)
        view.student = student
        return view

    def adopt_attributes(self, view: BatchContext) -> None:
        """Take over what a method set on ``view`` (a :meth:`with_student` copy), except its ``student``.

        The method's ``loss`` may leave values on its context for ``after_step``; under torchrun it ran
        on the view, while ``after_step`` gets this context.
        """
        for name, value in vars(view).items():
            if name != "student" and vars(self).get(name, _ABSENT) is not value:
                setattr(self, name, value)

    @property
    def x_adv(self) -> Tensor:
        """The adversarial batch produced by the inner maximisation (set by the trainer)."""
        if self._x_adv is None:
            raise RuntimeError("ctx.x_adv is not set: this method's attack_spec() returned None")
        return self._x_adv

    @x_adv.setter
    def x_adv(self, value: Tensor | None) -> None:
        self._x_adv = value
        # Teacher outputs on the previous x_adv are stale now.
        for key in [k for k in self._memo if k[1] == "adv"]:
            del self._memo[key]
        for probs_key in [k for k in self._probs if k[1] == "adv"]:
            del self._probs[probs_key]

    @property
    def has_x_adv(self) -> bool:
        return self._x_adv is not None

    def teacher_logits(self, role: str = "robust", on: str = "clean") -> Tensor:
        """Teacher logits on the clean (``on="clean"``) or adversarial (``on="adv"``) batch.

        Computed once per batch under ``no_grad`` and memoised: use it for targets. For a teacher
        that must be differentiated w.r.t. its input (inside an attack loss), call
        ``ctx.teachers[role](x)`` directly instead.
        """
        if on not in ("clean", "adv"):
            raise ValueError(f"on must be 'clean' or 'adv', got {on!r}")
        key = (role, on)
        cached = self._memo.get(key)
        if cached is None:
            inputs = self.x if on == "clean" else self.x_adv
            with torch.no_grad():
                cached = self.teachers[role](inputs).detach()
            self._memo[key] = cached
        return cached

    def teacher_probs(self, role: str = "robust", on: str = "clean", temperature: float = 1.0) -> Tensor:
        """``softmax(teacher_logits / temperature)``, memoised like the logits.

        Attack losses ask for the same target at every step; computing it once per batch keeps the
        attack loop down to the passes it needs.
        """
        key = (role, on, float(temperature))
        cached = self._probs.get(key)
        if cached is None:
            logits = self.teacher_logits(role, on)
            cached = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=1)
            self._probs[key] = cached
        return cached
