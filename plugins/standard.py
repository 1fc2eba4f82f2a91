r"""``standard``: plain cross-entropy on clean data, no attack (for training natural teachers).

Used to train the *natural* (standardly trained) teachers of the AKD paper's ensembles and as the
no-robustness baseline.

Loss::

    L = (1/B) sum_b CE(z_S(x_b), y_b)

Attack:
    none (``attack_spec`` returns None; the trainer never sets ``ctx.x_adv``).

The module reads top-down: this description, the pure loss :func:`standard_loss`, then the distiller
:class:`Standard` that gathers its tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.distiller import AttackSpec, Distiller, LossOutput, MethodConfig, option
from robustbench_kd.hookspecs import hookimpl

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar
    from robustbench_kd.threat import ThreatSpec


def standard_loss(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> LossOutput:
    """``mean_b CE(z(x_b), y_b)`` with optional label smoothing; term ``ce`` (the same value, detached)."""
    total = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing).mean()
    return LossOutput(total=total, terms={"ce": total.detach()})


class Standard(Distiller):
    r"""Standard training: cross-entropy on the clean batch, no inner maximisation, no teacher.

    The method (paper, loss, attack, reference defaults, deviations) is described in the module docstring.

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
    class Config(MethodConfig):
        """Hyper-parameters of standard training (see the class docstring)."""

        label_smoothing: float = option(
            0.0, low=0, high=1, high_open=True, help="label smoothing of the cross-entropy; 0 = plain CE"
        )

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        return None

    def loss(self, ctx: BatchContext) -> LossOutput:
        return standard_loss(self.student_logits(ctx, ctx.x), ctx.y, label_smoothing=self.config.label_smoothing)


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(Standard)
