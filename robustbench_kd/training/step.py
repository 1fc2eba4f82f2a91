"""One training step, as every method goes through it: :func:`train_step`.

It reads top to bottom as the protocol of :class:`robustbench_kd.distiller.Distiller` (the trainer never
branches on a method's name)::

    ctx = BatchContext(x, y, index, student, teachers, threat, counters)
    distiller.prepare(ctx)
    spec = distiller.attack_spec(threat)            # None: clean training
    ctx.x_adv = attack(x, y)                        # maximises distiller.attack_loss(ctx, x'); EpochAttacks
    out = distiller.loss(ctx)                       # student in train mode
    backward; DDP average of the method's gradients; gradient norm; optimiser step; EMA; per-batch schedule
    distiller.after_step(ctx, out); rbkd_step_end(run, ctx, out)

Precision, the compiled student, DDP and the EMA copy are the :class:`~robustbench_kd.training.engine.StepEngine`'s
named methods; the NaN/inf record is :class:`~robustbench_kd.training.nan_guard.FiniteGuard`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from robustbench_kd.context import BatchContext
from robustbench_kd.distiller import AttackSpec, Distiller
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.training.batches import Batch
from robustbench_kd.training.engine import StepEngine
from robustbench_kd.training.setup import Run


def train_step(
    run: Run, engine: StepEngine, attacks: EpochAttacks, batch: Batch, *, epoch: int, observe: bool
) -> tuple[tuple[str, ...], torch.Tensor]:
    """Train on one batch; return the names and on-device values of the loss and its terms.

    ``observe``: call the ``rbkd_step_end`` observers (rank 0 only under torchrun).
    """
    cfg, distiller = run.config, run.distiller
    _ensure_training(engine.student)
    ctx = BatchContext(
        x=engine.inputs(batch.x),
        y=batch.y,
        index=batch.index,
        student=engine.student,
        teachers=run.teachers,
        threat=cfg.threat,
        epoch=epoch,
        num_epochs=cfg.optim.epochs,
        step=batch.step,
        global_step=run.global_step,
    )
    distiller.prepare(ctx)
    spec = distiller.attack_spec(cfg.threat)
    if spec is not None:
        with engine.attack_precision():
            ctx.x_adv = attacks.attack(spec, ctx)
    _ensure_training(engine.student)
    loss_ctx = engine.loss_context(ctx)
    with engine.autocast():
        out = distiller.loss(loss_ctx)
    if loss_ctx is not ctx:  # torchrun: what loss() set on its view is there for after_step too
        ctx.adopt_attributes(loss_ctx)
    # NaN/inf loss terms and gradient norm are recorded on the device and looked at every few steps.
    names, values = run.guard.note_loss(out.total, out.terms, epoch=epoch, step=batch.step, global_step=run.global_step)
    engine.backward(out.total)
    engine.finish_gradients(global_step=run.global_step)
    engine.optimizer_step()
    engine.update_ema(run.global_step + 1)
    if run.per_batch_schedule:
        run.scheduler.step()
    distiller.after_step(ctx, out)
    if observe:
        run.host.step_end(run, ctx, out)
    return names, values


class EpochAttacks:
    """The epoch's attacks: one per distinct spec, built through ``rbkd_make_attack`` on first use.

    Building one per batch (the hook call and the ``torchattacks.Attack`` set-up) cost ~0.15 ms per batch
    in the loop of a small model, so an attack is reused for the epoch. The hook takes its ``loss_fn``
    (``x_adv -> per-sample loss``) when the attack is built, and that loss must be the one of the batch
    being attacked; :meth:`attack` therefore binds the batch's context for the length of the attack call
    and unbinds it afterwards (:class:`BatchAttackLoss`).
    """

    def __init__(self, host: PluginHost, distiller: Distiller, student: nn.Module) -> None:
        self._host, self._distiller, self._student = host, distiller, student
        self._loss = BatchAttackLoss(distiller)
        self._built: dict[AttackSpec, Any] = {}

    def attack(self, spec: AttackSpec, ctx: BatchContext) -> torch.Tensor:
        """``x_adv`` for ``ctx``'s batch: the attack ``spec`` asks for, maximising ``attack_loss(ctx, .)``."""
        attack = self._built.get(spec)
        if attack is None:
            attack = self._built[spec] = self._host.make_attack(
                distiller=self._distiller, student=self._student, spec=spec, loss_fn=self._loss
            )
        with self._loss.bound_to(ctx):
            return attack(ctx.x, ctx.y)


class BatchAttackLoss:
    """``x_adv -> distiller.attack_loss(ctx, x_adv)`` for the batch being attacked: an attack's ``loss_fn``.

    ``ctx`` is set only inside :meth:`bound_to` (the attack call); called outside it, the loss raises
    instead of evaluating another batch.
    """

    def __init__(self, distiller: Distiller) -> None:
        self._distiller = distiller
        self._ctx: BatchContext | None = None

    @contextlib.contextmanager
    def bound_to(self, ctx: BatchContext) -> Iterator[None]:
        self._ctx = ctx
        try:
            yield
        finally:
            self._ctx = None

    def __call__(self, x_adv: torch.Tensor) -> torch.Tensor:
        if self._ctx is None:
            raise RuntimeError(
                "an attack's loss_fn was called outside the attack call: rbkd_make_attack must "
                "only call it from inside attack(x, y)"
            )
        return self._distiller.attack_loss(self._ctx, x_adv)


def _ensure_training(student: nn.Module) -> None:
    """Put the student back in train mode if something (a plugin's attack or observer) left it in eval.

    Reads the root flag only: ``train()`` walks every submodule, a cost that showed in the per-batch
    bookkeeping of small models, and the built-in attack restores every flag itself (``module_mode``).
    """
    if not student.training:
        student.train()
