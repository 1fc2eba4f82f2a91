"""``standard``: plain cross-entropy on clean data, no attack (for training natural teachers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F

from robustbench_kd.distiller import AttackSpec, Distiller, LossOutput
from robustbench_kd.errors import UserError
from robustbench_kd.hookspecs import hookimpl

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar
    from robustbench_kd.threat import ThreatSpec


class Standard(Distiller):
    r"""Standard training: cross-entropy on the clean batch, no inner maximisation, no teacher.

    Used to train the *natural* (standardly trained) teachers of the AKD paper's ensembles and as the
    no-robustness baseline.

    Loss::

        L = (1/B) sum_b CE(z_S(x_b), y_b)

    Attack:
        none (``attack_spec`` returns None; the trainer never sets ``ctx.x_adv``).

    Arguments (``Standard.Config``):
        label_smoothing (float): label smoothing of the cross-entropy, in [0, 1). (Default: 0.0,
            i.e. plain CE; the AKD paper's standard teachers use none.)

    Teacher roles:
        none.

    Terms logged:
        ``ce``: the batch-mean cross-entropy.

    Examples::

        >>> distiller = Standard()
        >>> distiller.attack_spec(ThreatSpec()) is None
        True
    """

    name: ClassVar[str] = "standard"
    supports_distributed: ClassVar[bool] = True  # stateless, batch-mean loss
    paper: ClassVar[str] = "Standard training (cross-entropy on clean inputs; no attack, no teacher)"
    teacher_roles: ClassVar[tuple[str, ...]] = ()

    @dataclass(frozen=True, kw_only=True)
    class Config:
        """Hyper-parameters of standard training (see the class docstring)."""

        label_smoothing: float = 0.0

        def __post_init__(self) -> None:
            if not 0.0 <= self.label_smoothing < 1.0:
                raise UserError(f"method.label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        return None

    def loss(self, ctx: BatchContext) -> LossOutput:
        logits = self.student_logits(ctx, ctx.x)
        ce = F.cross_entropy(logits, ctx.y, reduction="none", label_smoothing=self.config.label_smoothing)
        total = ce.mean()
        return LossOutput(total=total, terms={"ce": total.detach()})


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(Standard)
