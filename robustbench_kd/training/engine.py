"""How a training step runs, apart from what it computes: precision, the compiled view, DDP and the EMA copy.

:class:`StepEngine` is the one object :func:`robustbench_kd.training.step.train_step` asks about these; with
every ``[speed]`` switch off, one process and ``ema.decay = 0`` each method is a plain call (``loss.backward()``,
``optimizer.step()``), so the step reads the same whatever is switched on:

==============================  ===========================================================================
``engine.student``              what ``prepare`` and the attack call: the compiled view of the student under
                                ``speed.compile``, else the student (:class:`~robustbench_kd.scale.precision.SpeedPlan`)
``engine.inputs(x)``            the batch in the models' memory format (``speed.channels_last``)
``engine.attack_precision()``   context of the inner maximisation: fp32 unless ``speed.attack_fp32 = false``
``engine.autocast()``           context of the outer loss: bf16/fp16 autocast under ``speed.amp``
``engine.loss_context(ctx)``    the context ``distiller.loss`` gets: under torchrun a second context whose
                                ``student`` is the DDP wrapper, whose backward averages the student's gradients
``engine.backward(loss)``       clear the last step's gradients, back-propagate (scaled by the fp16 GradScaler)
``engine.finish_gradients()``   average the method's own parameters' gradients over the processes and record
                                the gradient norm for the NaN guard (not under fp16: scaled gradients overflow
                                by design and the scaler skips those steps)
``engine.optimizer_step()``     the optimiser step (through the GradScaler under fp16)
``engine.update_ema(n)``        the EMA update after the n-th optimiser step (``[ema]``; every ``ema.every``)
==============================  ===========================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from robustbench_kd.context import BatchContext
from robustbench_kd.scale import distributed
from robustbench_kd.scale.ema import StudentEMA
from robustbench_kd.scale.precision import SpeedPlan
from robustbench_kd.scale.sections import SpeedSection
from robustbench_kd.training.nan_guard import FiniteGuard
from robustbench_kd.training.setup import Run


class StepEngine:
    """Precision, compile, DDP and EMA for one run's steps (see the module docstring for the API).

    Args:
        speed: the run's ``[speed]`` plan (a plan with every switch off when None).
        optimizer: the run's optimiser.
        student: the plain student; the EMA copy follows it.
        ddp_student: its DistributedDataParallel wrapper under torchrun, else None.
        ema: the averaged copy, or None with ``ema.decay = 0``.
        method_parameters: the method's own trainable parameters (outside the student), whose gradients
            DDP does not average.
        guard: the run's NaN/inf record.
    """

    def __init__(
        self,
        speed: SpeedPlan,
        optimizer: torch.optim.Optimizer,
        *,
        student: nn.Module,
        ddp_student: nn.Module | None,
        ema: StudentEMA | None,
        method_parameters: Iterable[nn.Parameter],
        guard: FiniteGuard,
    ) -> None:
        self._speed, self._optimizer, self._plain = speed, optimizer, student
        self._ddp, self._ema, self._guard = ddp_student, ema, guard
        self._method_parameters = list(method_parameters)
        self._parameters = [p for group in optimizer.param_groups for p in group["params"]]
        #: what ``prepare`` and the attack call (and the BatchContext carries): compiled view or plain student
        self.student: nn.Module = speed.student

    @classmethod
    def for_run(cls, run: Run) -> StepEngine:
        """The engine of ``run``'s current objects (built per epoch: a resume may replace the EMA copy)."""
        speed = run.speed if run.speed is not None else SpeedPlan(SpeedSection(), run.device, run.student, run.teachers)
        return cls(
            speed,
            run.optimizer,
            student=run.student,
            ddp_student=run.ddp_student,
            ema=run.ema,
            method_parameters=run.distiller.trainable_parameters(),
            guard=run.guard,
        )

    # -- forward ---------------------------------------------------------------------------------
    def inputs(self, x: Tensor) -> Tensor:
        return self._speed.inputs(x)

    def attack_precision(self) -> contextlib.AbstractContextManager[Any]:
        return self._speed.attack_precision()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self._speed.autocast()

    def loss_context(self, ctx: BatchContext) -> BatchContext:
        """``ctx`` itself in one process; under torchrun the same batch with the DDP wrapper as ``student``
        (only the outer loss goes through DDP: the attack ran on the plain student, input gradients only)."""
        return ctx if self._ddp is None else ctx.with_student(self._ddp)

    # -- backward and update ---------------------------------------------------------------------
    def backward(self, loss: Tensor) -> None:
        self._optimizer.zero_grad(set_to_none=True)
        self._speed.backward(loss)

    def finish_gradients(self, *, global_step: int) -> None:
        """Between backward and the optimiser step: average what DDP does not, record the gradient norm.

        The average is linear, so it commutes with the fp16 loss scale.
        """
        distributed.average_gradients(self._method_parameters)
        if not self._speed.scales_gradients:
            self._guard.note_gradients(self._parameters, global_step=global_step)

    def optimizer_step(self) -> None:
        self._speed.optimizer_step(self._optimizer)

    def update_ema(self, optimizer_steps: int) -> None:
        """After the ``optimizer_steps``-th optimiser step: the EMA update, if ``[ema]`` is on and it is due."""
        if self._ema is not None:
            self._ema.maybe_update(self._plain, optimizer_steps)
