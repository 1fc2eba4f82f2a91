"""Built-in inner maximiser: :class:`robustbench_kd.attacks.DistillationAttack` (PGD on the method's loss)."""

from __future__ import annotations

from robustbench_kd.attacks import DistillationAttack
from robustbench_kd.hookspecs import hookimpl


@hookimpl(trylast=True)
def rbkd_make_attack(student, spec, loss_fn):
    return DistillationAttack(
        student,
        loss_fn,
        eps=spec.eps,
        alpha=spec.alpha,
        steps=spec.steps,
        norm=spec.norm,
        init=spec.init,
        init_std=spec.init_std,
        student_mode=spec.student_mode,
        allow_large_step=spec.large_step,
    )
