"""Attack options that many methods offer, declared once, and the one helper that turns them into an AttackSpec.

A method's ``Config`` declares the options it exposes with these functions, each with its own default
(the method's reference code), for example::

    attack_student_mode: str = student_mode_option("train")   # ARD attacks with batch statistics
    init: str = init_option("gauss")                          # TRADES-style 0.001 N(0, I) start
    steps: int | None = steps_option()                        # None: the threat's step count

and :func:`threat_attack` builds the :class:`~robustbench_kd.distiller.AttackSpec` from the run's threat and
whichever of those options the Config has: the radius, step size and norm always come from the threat
model, so every method attacks the budget the run is evaluated at.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.distiller import ATTACK_INITS, STUDENT_MODES, AttackSpec, option

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.threat import ThreatSpec


def student_mode_option(default: str = "eval") -> Any:
    """``attack_student_mode``: the student's BN/dropout mode during the inner maximisation."""
    return option(
        default,
        choices=STUDENT_MODES,
        help="student BN/dropout mode in the attack: eval (running stats) or train (batch stats)",
    )


def init_option(default: str = "uniform") -> Any:
    """``init``: the attack's start, ``uniform`` (x + U(-eps, eps)), ``gauss`` (x + 0.001 N(0, I)) or ``none``."""
    return option(
        default,
        choices=ATTACK_INITS,
        help="attack start: uniform (x + U(-eps, eps)), gauss (x + 0.001 N(0, I)) or none",
    )


def steps_option(default: int | None = None) -> Any:
    """``steps``: attack steps overriding the threat's ``steps``; None keeps the threat's."""
    return option(default, low=0, integer=True, help="attack steps; None = the threat's steps")


def threat_attack(
    threat: ThreatSpec,
    config: Any = None,
    *,
    init: str | None = None,
    init_std: float = 1e-3,
    student_mode: str | None = None,
    steps: int | None = None,
    alpha: float | None = None,
    teacher_grad: bool = False,
    large_step: bool = False,
) -> AttackSpec:
    """The AttackSpec of a method that attacks the run's threat model.

    eps, alpha, steps and norm come from ``threat``; ``config``'s ``init``, ``attack_student_mode`` and
    ``steps`` options (where it declares them) override the defaults, and explicit keyword arguments
    override both (a method whose start is fixed by its reference code passes ``init=`` instead of
    offering the option).
    """
    chosen_steps = steps if steps is not None else getattr(config, "steps", None)
    return AttackSpec(
        eps=threat.eps,
        alpha=threat.alpha if alpha is None else alpha,
        steps=threat.steps if chosen_steps is None else chosen_steps,
        norm=threat.norm,
        init=init if init is not None else getattr(config, "init", "uniform"),
        init_std=init_std,
        student_mode=student_mode if student_mode is not None else getattr(config, "attack_student_mode", "eval"),
        teacher_grad=teacher_grad,
        large_step=large_step,
    )


class LabelCrossEntropyAttack:
    """Distiller mixin for the attack of Madry et al. that ARD and IAD keep: x' ascends CE(z_S(x'), y).

    The attack runs on the run's threat with the Config's ``init``/``attack_student_mode``/``steps`` options
    (:func:`threat_attack`); list it before the Distiller base: ``class ARD(LabelCrossEntropyAttack, Distiller)``.
    """

    config: Any

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        return threat_attack(threat, self.config)

    def attack_loss(self, ctx: BatchContext, x_adv: Tensor) -> Tensor:
        return F.cross_entropy(ctx.student(x_adv), ctx.y, reduction="none")
