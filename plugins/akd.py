r"""``akd``: Adversarial Knowledge Distillation (Maroto et al. 2022): adversarial training on label-mixed
teacher outputs at the student's adversarial example.

Paper: Maroto, Ortiz-Jimenez, Frossard, 'On the benefits of knowledge distillation for
adversarial robustness', arXiv 2022 [https://arxiv.org/abs/2203.07159]. No code was released;
what the paper leaves open is our choice and says so below.

Loss (paper Eq. 4)::

    q  = alpha * p_T(x') + (1 - alpha) * onehot(y)
    L  = (1/B) sum_b CE(p_S(x'_b), q_b) = -(1/B) sum_b sum_c q_bc log p_S(x'_b)_c

No temperature, batch mean. The teacher is evaluated at the student's adversarial example x'
(memoised ``ctx.teacher_probs("robust", "adv")``, no grad). alpha = 1 is pure adversarial
distillation at x'; alpha = 0 is PGD-AT. Only the student's forward on x' is needed.

Teacher ensembles (paper Eq. 5)::

    q = alpha * sum_i beta_i p_{T_i}(x') + (1 - alpha) * onehot(y),   beta_i >= 0, sum_i beta_i = 1

come for free: configure the role as an ensemble, ``teachers.robust = {specs = [...], weights =
[...]}`` (weights default to 1/M, the paper's choice for similarly trained teachers). The role is
then one :class:`~robustbench_kd.teachers.EnsembleTeacher` (``combine="probs"``) whose softmax is
exactly sum_i beta_i p_{T_i}(x'). Mixing 2 standard + 2 adversarial teachers with beta on the
adversarial pair gives the paper's clean/robust trade-off (Fig. 3).

Attack (paper Section 2: "x' = argmax CE(f(x'), y) ... PGD"; PGD-7 for all AKD runs, Appendix A)::

    x' = PGD_{eps, alpha_step, K=7}( CE(z_S(x'), y) ),  uniform start, student in eval mode

eps and the step size come from the run's threat (paper: eps = 8/255; the step is unstated, our
choice is the threat's default 2/255); K = ``steps`` (7) overrides the threat's steps unless set to None.
The uniform start and the eval-mode student in the attack are our choices too (Madry PGD-AT's start;
the paper does not say).

The module reads top-down: this description, the pure loss :func:`akd_loss`, then the distiller
:class:`AKD` that gathers its tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.distiller import AttackSpec, Distiller, LossOutput, MethodConfig, option
from robustbench_kd.errors import UserError
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.methods.attack_options import init_option, student_mode_option, threat_attack
from robustbench_kd.methods.losses import mix_with_labels, soft_cross_entropy_from_log_probs

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar
    from robustbench_kd.threat import ThreatSpec


def akd_loss(student_logits_adv: Tensor, teacher_probs_adv: Tensor, labels: Tensor, *, alpha: float) -> LossOutput:
    """``mean_b CE(p_S(x'_b), alpha * p_T(x'_b) + (1 - alpha) * onehot(y_b))`` (paper Eq. 4).

    Terms: ``ce_mixed`` (the loss), ``ce_label`` (CE to y) and ``ce_teacher`` (CE to p_T(x')), all on x'.
    """
    q = mix_with_labels(teacher_probs_adv, labels, alpha)
    log_p = F.log_softmax(student_logits_adv, dim=1)
    total = soft_cross_entropy_from_log_probs(log_p, q).mean()  # log_p shared with the logged terms
    log_p = log_p.detach()
    terms = {
        "ce_mixed": total.detach(),
        "ce_label": F.nll_loss(log_p, labels),
        "ce_teacher": soft_cross_entropy_from_log_probs(log_p, teacher_probs_adv).mean(),
    }
    return LossOutput(total=total, terms=terms)


class AKD(Distiller):
    r"""AKD: PGD-AT whose target mixes the teacher's prediction at x' with the one-hot label.

    The method (paper, loss, attack, reference defaults, deviations) is described in the module docstring.

    Arguments (``AKD.Config``):
        alpha (float): label-mixing weight of the teacher, in [0, 1]. (Default: 0.75. Why: it is the
            paper's setting that maximises robustness with adversarially trained teachers -- the
            ``robust`` role -- in its headline ResNet-18 results (Table 2 and Tables S1/S2: AT-PGD7
            teacher early-stopped at epoch 30, alpha = 0.75 -> 82.70 clean / 47.66 AA on CIFAR-10;
            same on CIFAR-100). 1.0 is used only in ablations "to avoid any confounding effect from
            label mixing"; 0.5 is the "conservative trade-off" and the choice for standardly trained
            teachers; the WRN-28-10 self-distillation (Table 6) uses 0.8.)
        steps (int | None): attack steps; None = the threat's ``steps``. (Default: 7, paper.)
        init (str): attack start. (Default: "uniform", our choice: Madry PGD-AT.)
        attack_student_mode (str): student BN mode in the attack. (Default: "eval", our choice.)

    Teacher roles:
        robust: one teacher or a weighted ensemble (Eq. 5). Teacher early stopping (the paper's
        other key ingredient) is a choice of checkpoint: ``file:runs/teacher/checkpoints/epoch_030.pt``.

    Terms logged:
        ``ce_mixed`` (the loss), ``ce_label`` (CE to y) and ``ce_teacher`` (CE to p_T(x')) on x';
        ``ce_mixed = alpha * ce_teacher + (1 - alpha) * ce_label``.

    Examples::

        >>> akd = AKD()                                  # alpha 0.75, PGD-7
        >>> pure = AKD(AKD.Config(alpha=1.0))            # no label mixing
        >>> # run config: [method] name = "akd", alpha = 0.75
        >>> #             [teachers.robust] specs = ["file:t1.pt", "file:t2.pt"], weights = [0.25, 0.75]
    """

    name: ClassVar[str] = "akd"
    supports_distributed: ClassVar[bool] = True  # stateless, batch-mean loss
    paper: ClassVar[str] = (
        "Javier Maroto, Guillermo Ortiz-Jimenez, Pascal Frossard. On the benefits of knowledge distillation "
        "for adversarial robustness. arXiv 2022. arXiv:2203.07159"
    )
    teacher_roles: ClassVar[tuple[str, ...]] = ("robust",)

    @dataclass(frozen=True, kw_only=True)
    class Config(MethodConfig):
        """Hyper-parameters of AKD (see the class docstring for meanings and provenance)."""

        alpha: float = option(0.75, low=0, high=1, help="teacher weight of the label-mixed target at x'")
        # Not option(): its default is 7, yet None (the threat's steps) is accepted too; checked below.
        steps: int | None = 7
        init: str = init_option("uniform")
        attack_student_mode: str = student_mode_option("eval")

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.steps is not None and (isinstance(self.steps, bool) or self.steps < 0):
                raise UserError(f"method.steps must be a non-negative integer or None, got {self.steps!r}")

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        return threat_attack(threat, self.config)

    def attack_loss(self, ctx: BatchContext, x_adv: Tensor) -> Tensor:
        return F.cross_entropy(self.student_logits(ctx, x_adv), ctx.y, reduction="none")

    def target(self, ctx: BatchContext) -> Tensor:
        """q = alpha * p_T(x') + (1 - alpha) * onehot(y) (no grad)."""
        return mix_with_labels(ctx.teacher_probs("robust", "adv"), ctx.y, self.config.alpha)

    def loss(self, ctx: BatchContext) -> LossOutput:
        return akd_loss(
            self.student_logits(ctx, ctx.x_adv), ctx.teacher_probs("robust", "adv"), ctx.y, alpha=self.config.alpha
        )


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(AKD)
