"""Built-in inner maximiser: :class:`robustbench_kd.attacks.DistillationAttack` (PGD on the method's loss)."""

from __future__ import annotations

from robustbench_kd.attacks import DistillationAttack
from robustbench_kd.hookspecs import hookimpl


@hookimpl(trylast=True)
def rbkd_make_attack(student, spec, loss_fn):
    return DistillationAttack.from_spec(student, loss_fn, spec)
