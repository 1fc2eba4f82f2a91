r"""``adaad`` and ``adaiad``: Adaptive Adversarial Distillation, and AdaAD's attack with IAD-I's loss.

Paper: Bo Huang, Mingyang Chen, Yi Wang, Junda Lu, Minhao Cheng, Wei Wang, 'Boosting Accuracy and
Robustness of Student Models via Adaptive Adversarial Distillation', CVPR 2023, pp. 24668-24677 (no
arXiv version). Reference code: the authors' boyellow/AdaAD repository (``AT_helper.py``
``adaad_inner_loss``, ``main.py``), which also ships AdaIAD (``--method AdaAD_with_IAD1``).

Attack (both methods): the teacher takes part in the inner search::

    x' = PGD_{eps, alpha, K}( KL(p_T(x') || p_S(x')) ),  x'_0 = x + 0.001 N(0, I), student in eval mode

Teacher and student are evaluated at the SAME moving point x'_k and neither output is detached, so the
ascent direction includes the teacher's input gradient (the teacher is called directly, not through
the memoised no-grad call). The teacher's parameters are frozen and get no gradient (the reference
never freezes them; we do). tau = 1 in the attack. Budget: the run's threat (reference README command:
8/255, 2/255, 10 steps; the argparse defaults 16/255 and 4/255 are a larger-radius variant).

Notation: KL(q || p) = sum_c q_c (log q_c - log p_c); p^tau = softmax(z / tau); R = the batch reduction
``kl_reduction``; teacher outputs in the loss are memoised, without gradient.

AdaAD loss (``adaad``)::

    L = a tau^2 R( KL(p_T^tau(x') || p_S^tau(x')) ) + (1 - a) tau^2 R( KL(p_T^tau(x) || p_S^tau(x)) )

with a = ``alpha`` = 1 by default (the clean term is off) and tau = 1 (the reference has no temperature
here; the tau^2 scaling only matters if you change it). The reference uses ``nn.KLDivLoss()`` (mean over
B*C, ``mean_all``) on CIFAR-10 and sum / B (``batchmean``) on CIFAR-100, so the same script's loss is
10x stronger on CIFAR-100. Class counts without a reference value get ``mean_all`` up to 10 classes and
``batchmean`` above (our choice).

AdaIAD loss (``adaiad``: IAD-I's loss of Zhu et al., ICLR 2022, arXiv:2106.04928, with the teacher
target at x' instead of x; see :mod:`robustbench_kd.methods.introspection`)::

    w_b = softmax(z_T(x'_b))_{y_b} ** beta                     (no gradient, tau = 1)
    epoch >= begin:  L = A tau^2 R( W_b KL(p_T^tau(x'_b) || p_S^tau(x'_b)) )
                         + A R( (1 - w_b) KL(p_S(x_b) || p_S(x'_b)) ) + (1 - A) CE(z_S(x), y)
    epoch <  begin:  L = A tau^2 R( KL(p_T^tau(x'_b) || p_S^tau(x'_b)) ) + (1 - A) CE(z_S(x), y)

A = ``alpha`` (1.0), W_b = w_b if ``weight_teacher_term`` else 1 (reference: 1), p_S(x) not detached,
R = batchmean, tau = ``temperature`` = 30 by default: the script's ``--temp`` default, so the teacher
term is 900x the batchmean KL at tau = 30. That is the code's value; check it before reproducing.
``begin`` counts 0-based epochs.

Forward order as the reference (both methods): student(x) then student(x'), both in train mode,
separate passes; the clean pass runs every batch even when nothing uses it, so BN running statistics
see the clean batch (``clean_forward_when_unused``). The reference AdaIAD re-runs student(x) for the
introspection target and the CE; one pass is used here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.distiller import AttackSpec, Distiller, LossOutput, MethodConfig, option
from robustbench_kd.errors import UserError
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.methods.attack_options import init_option, student_mode_option, threat_attack
from robustbench_kd.methods.introspection import (
    IntrospectionWarmUp,
    clean_pass,
    iad1_objective,
)
from robustbench_kd.methods.losses import KL_REDUCTIONS, kl_logits_per_sample, kl_per_sample, reduce_kl

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar
    from robustbench_kd.threat import ThreatSpec

BOOLS = (False, True)


def default_kl_reduction(num_classes: int) -> str:
    """AdaAD's reference reduction: ``mean_all`` (``nn.KLDivLoss()``) up to 10 classes, ``batchmean`` above."""
    return "mean_all" if num_classes <= 10 else "batchmean"


# -- losses ----------------------------------------------------------------------------------------------
def adaptive_attack_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """The attack objective KL(p_T(x') || p_S(x')) per sample, at tau = 1 (both sides keep their graphs)."""
    return kl_logits_per_sample(student_logits, teacher_logits)


def adaad_objective(kl_adv: Tensor, kl_nat: Tensor | None, *, alpha: float, temperature: float) -> Tensor:
    """AdaAD's total ``a tau^2 kl_adv + (1 - a) tau^2 kl_nat`` (the clean term only when given)."""
    tau = temperature
    total = alpha * tau * tau * kl_adv
    if kl_nat is not None:
        total = total + (1.0 - alpha) * tau * tau * kl_nat
    return total


# -- the shared attack -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class AdaptiveAttackConfig(MethodConfig):
    """Options AdaAD and AdaIAD share: the loss weight a, the teacher-in-the-loop attack, the clean pass."""

    alpha: float = option(1.0, low=0, high=1, help="weight a of the adversarial / distillation terms")
    init: str = init_option("gauss")
    attack_student_mode: str = student_mode_option("eval")
    attack_teacher_grad: bool = option(
        True, choices=BOOLS, help="differentiate the teacher w.r.t. x' in the attack (False: ablation)"
    )
    clean_forward_when_unused: bool = option(
        True, choices=BOOLS, help="run student(x) without grad for BN statistics when unused"
    )


class AdaptiveAttack(Distiller):
    """The attack of AdaAD and AdaIAD: ascend KL(p_T(x') || p_S(x')) with the teacher at the moving point."""

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        return threat_attack(threat, self.config, teacher_grad=self.config.attack_teacher_grad)

    def attack_loss(self, ctx: BatchContext, x_adv: Tensor) -> Tensor:
        """KL(p_T(x') || p_S(x')) per sample, both at x'; differentiable through the teacher's input."""
        teacher = ctx.teachers["robust"]
        if self.config.attack_teacher_grad:
            teacher_logits = teacher(x_adv)
        else:
            with torch.no_grad():
                teacher_logits = teacher(x_adv)
        return adaptive_attack_loss(self.student_logits(ctx, x_adv), teacher_logits)


class AdaAD(AdaptiveAttack):
    r"""AdaAD: the teacher takes part in the inner search; the student matches it at that point.

    Loss, attack and reference defaults: see the module docstring of ``robustbench_kd_plugins.adaad``.

    Arguments (``AdaAD.Config``):
        alpha (float): weight of the adversarial KL, (1 - alpha) on the clean KL (``--AdaAD_alpha``).
            (Default: 1.0, code.)
        temperature (float): tau of the outer loss. (Default: 1.0.)
        kl_reduction (str | None): ``"mean_all"``, ``"batchmean"`` or ``"sum"``; None = reference default
            (:func:`default_kl_reduction`: mean_all for <= 10 classes, batchmean otherwise). (Default: None.)
        init (str): attack start, ``"gauss"`` (0.001 N(0, I)) or ``"none"`` (``random_init=False``).
            (Default: "gauss", code.)
        attack_student_mode (str): student BN mode in the attack. (Default: "eval", code ``BN_eval``.)
        attack_teacher_grad (bool): differentiate the teacher w.r.t. x' in the attack; False evaluates
            the teacher at x'_k without gradient (an ablation: the ascent then follows the student
            only). (Default: True, code.)
        clean_forward_when_unused (bool): run student(x) in train mode (no grad) even when the loss does
            not use it. (Default: True, code.)

    Teacher roles:
        robust: the robust teacher (reference: Chen2021LTD_WRN34_20 on CIFAR-10, Chen2021LTD_WRN34_10
        on CIFAR-100).

    Terms logged:
        ``kl_adv``, ``kl_nat`` (the reduced KLs, before weights and tau^2; ``kl_nat`` only when alpha < 1).

    Examples::

        >>> adaad = AdaAD(num_classes=10)                                  # alpha 1, mean_all on 10 classes
        >>> # run config: [method] name = "adaad", alpha = 0.9
    """

    name: ClassVar[str] = "adaad"
    supports_distributed: ClassVar[bool] = True  # stateless, batch-mean loss
    paper: ClassVar[str] = (
        "Bo Huang, Mingyang Chen, Yi Wang, Junda Lu, Minhao Cheng, Wei Wang. Boosting Accuracy and Robustness "
        "of Student Models via Adaptive Adversarial Distillation. CVPR 2023"
    )
    teacher_roles: ClassVar[tuple[str, ...]] = ("robust",)

    @dataclass(frozen=True, kw_only=True)
    class Config(AdaptiveAttackConfig):
        """Hyper-parameters of AdaAD (see the class docstring for meanings and provenance)."""

        temperature: float = option(1.0, low=0, low_open=True, help="tau of the outer loss")
        kl_reduction: str | None = option(
            None, choices=KL_REDUCTIONS, help="batch reduction; None = mean_all up to 10 classes, batchmean above"
        )

    @classmethod
    def config_from_mapping(cls, values: Mapping[str, Any]) -> Any:
        """As :meth:`Distiller.config_from_mapping`; the retired ``variant`` option names its replacement."""
        if "variant" in values:
            if values["variant"] != "adaad":
                raise UserError(
                    f"method.variant was removed from adaad: AdaIAD is its own method, use "
                    f'[method] name = "adaiad" (got variant = {values["variant"]!r})'
                )
            values = {k: v for k, v in values.items() if k != "variant"}
        return super().config_from_mapping(values)

    def __init__(self, config: Any = None, *, num_classes: int = 10) -> None:
        super().__init__(config, num_classes=num_classes)
        self.temperature = float(self.config.temperature)
        self.kl_reduction = self.config.kl_reduction or default_kl_reduction(num_classes)

    def loss(self, ctx: BatchContext) -> LossOutput:
        cfg = self.config
        tau, red = self.temperature, self.kl_reduction
        # Reference order: student(x) then student(x'), train mode, separate passes.
        logits_nat = clean_pass(
            ctx.student, ctx.x, needed=cfg.alpha < 1.0, forward_when_unused=cfg.clean_forward_when_unused
        )
        logits_adv = self.student_logits(ctx, ctx.x_adv)
        c = logits_adv.shape[1]
        kl_adv = reduce_kl(
            kl_per_sample(logits_adv, ctx.teacher_probs("robust", "adv", temperature=tau), temperature=tau), red, c
        )
        terms = {"kl_adv": kl_adv.detach()}
        kl_nat: Tensor | None = None
        if cfg.alpha < 1.0:
            assert logits_nat is not None
            kl_nat = reduce_kl(
                kl_per_sample(logits_nat, ctx.teacher_probs("robust", "clean", temperature=tau), temperature=tau),
                red,
                c,
            )
            terms["kl_nat"] = kl_nat.detach()
        return LossOutput(total=adaad_objective(kl_adv, kl_nat, alpha=cfg.alpha, temperature=tau), terms=terms)


class AdaIAD(IntrospectionWarmUp, AdaptiveAttack):
    r"""AdaIAD: AdaAD's teacher-in-the-loop attack with IAD-I's introspective loss (teacher target at x').

    Loss, attack and reference defaults: see the module docstring of ``robustbench_kd_plugins.adaad``.

    Arguments (``AdaIAD.Config``):
        alpha (float): A, weight of the distillation terms, (1 - A) on the clean CE (``--IAD_alpha``).
            (Default: 1.0, code.)
        temperature (float): tau of the teacher term (``--temp``). (Default: 30.0, code.)
        kl_reduction (str): ``"batchmean"``, ``"mean_all"`` or ``"sum"``. (Default: "batchmean", code.)
        beta (float): reliability exponent (``--IAD_beta``). (Default: 0.1, code.)
        begin (int): warm-up, first 0-based epoch with the introspection term (``--IAD_begin``).
            (Default: 60, code.)
        weight_teacher_term (bool): multiply the teacher KL by w_b (IAD paper form). (Default: False, code.)
        detach_self_target (bool): stop the gradient through p_S(x). (Default: False, code.)
        init, attack_student_mode, attack_teacher_grad, clean_forward_when_unused: as :class:`AdaAD`.

    Teacher roles:
        robust: as :class:`AdaAD`.

    Terms logged:
        ``kl_teacher`` (R of the (weighted) teacher KL), ``kl_intro`` and ``w_mean`` (after the
        warm-up), ``ce_nat``.

    Examples::

        >>> adaiad = AdaIAD()                                              # tau 30, begin 60, batchmean
        >>> # run config: [method] name = "adaiad", begin = 60
    """

    name: ClassVar[str] = "adaiad"
    supports_distributed: ClassVar[bool] = True  # only an epoch counter
    paper: ClassVar[str] = AdaAD.paper
    teacher_roles: ClassVar[tuple[str, ...]] = ("robust",)

    @dataclass(frozen=True, kw_only=True)
    class Config(AdaptiveAttackConfig):
        """Hyper-parameters of AdaIAD (see the class docstring for meanings and provenance)."""

        temperature: float = option(30.0, low=0, low_open=True, help="tau of the teacher term")
        kl_reduction: str = option("batchmean", choices=KL_REDUCTIONS, help="batch reduction of the KL terms")
        beta: float = option(0.1, low=0, help="exponent of the reliability weight p_T(y|x')**beta")
        begin: int = option(60, low=0, integer=True, help="first 0-based epoch with the introspection term")
        weight_teacher_term: bool = option(False, choices=BOOLS, help="multiply the teacher KL by w (paper form)")
        detach_self_target: bool = option(
            False, choices=BOOLS, help="stop the gradient through p_S(x) in the introspection KL"
        )

    def __init__(self, config: Any = None, *, num_classes: int = 10) -> None:
        super().__init__(config, num_classes=num_classes)
        self.temperature = float(self.config.temperature)
        self.kl_reduction = self.config.kl_reduction
        self.begin = int(self.config.begin)
        self._epoch = 0

    def loss(self, ctx: BatchContext) -> LossOutput:
        cfg = self.config
        tau, red = self.temperature, self.kl_reduction
        active = self.introspection_active
        logits_nat = clean_pass(
            ctx.student, ctx.x, needed=active or cfg.alpha < 1.0, forward_when_unused=cfg.clean_forward_when_unused
        )
        logits_adv = self.student_logits(ctx, ctx.x_adv)
        kl_t = kl_per_sample(logits_adv, ctx.teacher_probs("robust", "adv", temperature=tau), temperature=tau)
        parts = self.introspect(
            ctx, kl_t, logits_adv, logits_nat, weight_teacher_term=cfg.weight_teacher_term, reduction=red
        )
        terms: dict[str, Tensor] = {}
        parts.log_terms(terms, logits_nat=logits_nat, y=ctx.y)
        ce_nat = F.cross_entropy(logits_nat, ctx.y) if cfg.alpha < 1.0 and logits_nat is not None else None
        total = iad1_objective(
            parts.teacher, parts.introspection, ce_nat, alpha=cfg.alpha, ce_weight=1.0 - cfg.alpha, temperature=tau
        )
        return LossOutput(total=total, terms=terms)


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(AdaAD)
    registry.add(AdaIAD)
