r"""``iad``: Introspective Adversarial Distillation, variants IAD-I and IAD-II.

Paper: Jianing Zhu, Jiangchao Yao, Bo Han, Jingfeng Zhang, Tongliang Liu, Gang Niu, Jingren Zhou,
Jianliang Xu, Hongxia Yang, 'Reliable Adversarial Distillation with Unreliable Teachers', ICLR 2022,
arXiv:2106.04928. Reference code: the authors' ZFancy/IAD repository (``IAD-I.py``, ``IAD-II.py``).

The teacher is trusted per sample in proportion to its confidence in the true label at the student's
adversarial example; the remaining weight goes to the student's own clean prediction
(:mod:`robustbench_kd.methods.introspection`). From the ``robust`` teacher on x' (no gradient)::

    w_b = softmax(z_T(x'_b))_{y_b} ** beta                       (beta = 0.1, tau = 1)

Notation: KL(q || p) = sum_c q_c (log q_c - log p_c); p^tau = softmax(z / tau); R = the batch
reduction ``kl_reduction`` (reference: batchmean, (1/B) sum_b), applied after the per-sample weights;
intro_b = KL(p_S(x_b) || p_S(x'_b)) at tau = 1 with p_S(x) not detached (as the reference);
W_b = w_b if ``weight_teacher_term`` else 1.

IAD-I (``variant = "I"``, built on ARD), from epoch ``begin`` on::

    L = a tau^2 R( W_b KL(p_T^tau(x_b) || p_S^tau(x'_b)) ) + a R( (1 - w_b) intro_b ) + (1 - a) CE(z_S(x), y)

with the teacher target on the CLEAN x (memoised, no gradient) and the CE on the student's clean output.

IAD-II (``variant = "II"``, built on AKD2 of Chen et al. 2021, 'Robust Overfitting may be Mitigated by
Properly Learned Smoothening': ``robust`` = adversarially trained teacher T, ``natural`` =
standard-trained teacher N), from epoch ``begin`` on::

    L = (1 - a - a2) CE(z_S(x'), y)
        + a tau^2 [ R( W_b KL(p_T^tau(x'_b) || p_S^tau(x'_b)) ) + R( (1 - w_b) intro_b ) ]
        + a2 tau^2 R( KL(p_N^tau(x'_b) || p_S^tau(x'_b)) )

with both teachers at x' (memoised, no gradient) and the CE on the student's ADVERSARIAL output. The
introspection term carries tau^2 here but not in IAD-I, as in the reference; at the default tau = 1
this makes no difference.

Warm-up (both variants): before epoch ``begin`` (0-based, as ``epoch >= args.begin`` in the code) w is
not used (W_b = 1) and the introspection term is absent, i.e. IAD-I is ARD with batchmean and IAD-II
is AKD2.

Attack (both variants, ARD's)::

    x' = PGD_{eps, alpha, K}( CE(z_S(x'), y) ),  uniform start U(-eps, eps), student in TRAIN mode

Budget: the run's threat (reference: 8/255, 2/255, 10 steps).

Reference defaults per variant (the scripts' argparse defaults): IAD-I a = 1 (the CE term vanishes),
begin = 60, the teacher KL NOT weighted by w (every version of ``IAD-I.py``); IAD-II a = 0.5, a2 = 0.25,
begin = 40, the teacher KL weighted by w (``IAD-II.py`` and the paper's formula). The reference IAD-I
runs the student on the clean batch every batch even when nothing uses it (BN statistics); IAD-II
does not.

Deviations / notes:
    * w is vectorised (the reference loops over samples with ``.item()``); same values.
    * Forward order as the reference: student(x') then student(x), both in train mode, separate passes;
      the reference's duplicated student(x) passes are not replicated (one pass gives the CE and the
      introspection target), nor the unused extra student(x') pass of some IAD-I versions (which only
      adds a BN running-statistics update).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.distiller import Distiller, LossOutput, MethodConfig, option
from robustbench_kd.errors import UserError
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.methods.attack_options import (
    LabelCrossEntropyAttack,
    init_option,
    student_mode_option,
)
from robustbench_kd.methods.introspection import (
    IntrospectionWarmUp,
    clean_pass,
    iad1_objective,
)
from robustbench_kd.methods.losses import KL_REDUCTIONS, kl_per_sample, reduce_kl

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar

VARIANTS = ("I", "II")
BOOLS = (False, True)

#: Reference defaults per variant (the argparse defaults of ``IAD-I.py`` / ``IAD-II.py``).
VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "I": {
        "alpha": 1.0,
        "natural_weight": 0.0,
        "begin": 60,
        "weight_teacher_term": False,
        "clean_forward_when_unused": True,
    },
    "II": {
        "alpha": 0.5,
        "natural_weight": 0.25,
        "begin": 40,
        "weight_teacher_term": True,
        "clean_forward_when_unused": False,
    },
}


# -- the loss of IAD-II (IAD-I's is :func:`robustbench_kd.methods.introspection.iad1_objective`) -------------------
def iad2_objective(
    kl_teacher: Tensor,
    kl_intro: Tensor | None,
    kl_natural: Tensor,
    ce_adv: Tensor,
    *,
    alpha: float,
    natural_weight: float,
    ce_weight: float,
    temperature: float,
) -> Tensor:
    """IAD-II's total: ``a tau^2 (teacher + self) + a2 tau^2 natural + ce_weight CE(z_S(x'), y)``.

    ``kl_intro`` is None during the warm-up; the CE is added only when ``ce_weight > 0``.
    """
    tau = temperature
    teacher_part = kl_teacher if kl_intro is None else kl_teacher + kl_intro
    total = alpha * tau * tau * teacher_part + natural_weight * tau * tau * kl_natural
    if ce_weight > 0.0:
        total = total + ce_weight * ce_adv
    return total


class IAD(LabelCrossEntropyAttack, IntrospectionWarmUp, Distiller):
    r"""IAD: trust the teacher per sample by its confidence in the true label at x', else introspect.

    Loss, attack and reference defaults: see the module docstring of ``robustbench_kd_plugins.iad``.

    Arguments (``IAD.Config``):
        variant (str): ``"I"`` or ``"II"``. (Default: "I".)
        temperature (float): tau of the teacher terms. (Default: 1.0, code ``--temp``.)
        alpha (float | None): a, weight of the robust-teacher (and introspection) terms; None = reference
            default per variant: 1.0 for IAD-I (``--alpha``, the CE term vanishes), 0.5 for IAD-II
            (``--alpha1``). (Default: None.)
        natural_weight (float | None): a2, weight of the natural-teacher term (IAD-II only); None =
            0.25 for IAD-II (``--alpha2``), 0 for IAD-I. a + a2 must not exceed 1. (Default: None.)
        beta (float): exponent of the reliability weight. (Default: 0.1, code.)
        begin (int | None): first (0-based) epoch with the introspection term; None = 60 for IAD-I,
            40 for IAD-II (code ``--begin``). (Default: None.)
        weight_teacher_term (bool | None): multiply the teacher KL by w_b after the warm-up; None =
            reference per variant: False for IAD-I, True for IAD-II. (Default: None.)
        detach_self_target (bool): stop the gradient through p_S(x) in the introspection KL.
            (Default: False, code.)
        kl_reduction (str): ``"batchmean"``, ``"mean_all"`` or ``"sum"``. (Default: "batchmean", code.)
        init (str): attack start. (Default: "uniform", code.)
        attack_student_mode (str): student BN mode in the attack. (Default: "train", code.)
        clean_forward_when_unused (bool | None): when the student's clean output is not needed (before
            the warm-up with CE weight 0), still run student(x) in train mode without grad so BN
            running statistics see the clean batch; None = reference per variant: True for IAD-I,
            False for IAD-II. (Default: None.)

    Teacher roles:
        robust: the adversarially trained teacher (reference: early-stopped PGD-AT ResNet-18).
        natural: IAD-II only, the standard-trained teacher (reference: WRN-34-10 trained on clean data).

    Terms logged:
        ``kl_teacher`` (R of the (weighted) robust-teacher KL, before a and tau^2), ``kl_intro``
        (R of (1 - w) intro; after the warm-up), ``w_mean`` (batch mean of w; after the warm-up),
        ``kl_natural`` and ``ce_adv`` (IAD-II), ``ce_nat`` (clean CE, whenever the clean pass runs).

    Examples::

        >>> iad1 = IAD()                                                # IAD-I code defaults
        >>> iad2 = IAD(IAD.Config(variant="II"))                        # needs robust + natural teachers
        >>> paper = IAD(IAD.Config(weight_teacher_term=True))           # IAD-I as written in the paper
        >>> # run config: [method] name = "iad", variant = "II", begin = 40
    """

    name: ClassVar[str] = "iad"
    supports_distributed: ClassVar[bool] = True  # only an epoch counter
    paper: ClassVar[str] = (
        "Jianing Zhu, Jiangchao Yao, Bo Han, Jingfeng Zhang, Tongliang Liu, Gang Niu, Jingren Zhou, Jianliang Xu, "
        "Hongxia Yang. Reliable Adversarial Distillation with Unreliable Teachers. ICLR 2022. arXiv:2106.04928"
    )
    # Class level: what IAD-I needs plus what IAD-II can use. Instances narrow this to their variant
    # (the trainer reads the instance), so IAD-II requires ``natural`` and IAD-I rejects it.
    teacher_roles: ClassVar[tuple[str, ...]] = ("robust",)
    optional_teacher_roles: ClassVar[tuple[str, ...]] = ("natural",)

    @dataclass(frozen=True, kw_only=True)
    class Config(MethodConfig):
        """Hyper-parameters of IAD (see the class docstring for meanings and provenance)."""

        variant: str = option("I", choices=VARIANTS, help="IAD-I (ARD-based) or IAD-II (AKD2-based, two teachers)")
        temperature: float = option(1.0, low=0, low_open=True, help="tau of the teacher terms")
        alpha: float | None = option(
            None, low=0, high=1, help="weight a of the teacher and introspection terms; None = 1.0 (I), 0.5 (II)"
        )
        natural_weight: float | None = option(
            None, low=0, high=1, help="weight a2 of the natural-teacher term (IAD-II); None = 0.25"
        )
        beta: float = option(0.1, low=0, help="exponent of the reliability weight p_T(y|x')**beta")
        begin: int | None = option(
            None, low=0, integer=True, help="first 0-based epoch with the introspection term; None = 60 (I), 40 (II)"
        )
        weight_teacher_term: bool | None = option(
            None, choices=BOOLS, help="multiply the teacher KL by w; None = False (I), True (II)"
        )
        detach_self_target: bool = option(
            False, choices=BOOLS, help="stop the gradient through p_S(x) in the introspection KL"
        )
        kl_reduction: str = option("batchmean", choices=KL_REDUCTIONS, help="batch reduction of the KL terms")
        init: str = init_option("uniform")
        attack_student_mode: str = student_mode_option("train")
        clean_forward_when_unused: bool | None = option(
            None,
            choices=BOOLS,
            help="run student(x) without grad for BN statistics when unused; None = True (I), False (II)",
        )

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.variant == "I" and self.natural_weight not in (None, 0.0):
                raise UserError(
                    "method.natural_weight is an IAD-II option (natural teacher); "
                    'set method.variant = "II" or remove it'
                )
            a, a2 = self.resolved("alpha"), self.resolved("natural_weight")
            if a + a2 > 1.0 + 1e-12:
                raise UserError(
                    f"method.alpha + method.natural_weight must not exceed 1 (the CE weight is "
                    f"1 - alpha - natural_weight), got {a} + {a2}"
                )

        def resolved(self, key: str) -> Any:
            """The value of option ``key`` with None replaced by the reference default of the variant."""
            value = getattr(self, key)
            return VARIANT_DEFAULTS[self.variant][key] if value is None else value

    def __init__(self, config: Any = None, *, num_classes: int = 10) -> None:
        super().__init__(config, num_classes=num_classes)
        cfg = self.config
        self.alpha = float(cfg.resolved("alpha"))
        self.natural_weight = float(cfg.resolved("natural_weight"))
        self.begin = int(cfg.resolved("begin"))
        self.weight_teacher_term = bool(cfg.resolved("weight_teacher_term"))
        self.clean_forward_when_unused = bool(cfg.resolved("clean_forward_when_unused"))
        # Roles of this instance (the trainer checks the configured teachers against these).
        self.teacher_roles = ("robust", "natural") if cfg.variant == "II" else ("robust",)  # type: ignore[misc]
        self.optional_teacher_roles = ()  # type: ignore[misc]
        self._epoch = 0

    def loss(self, ctx: BatchContext) -> LossOutput:
        cfg = self.config
        tau, red = cfg.temperature, cfg.kl_reduction
        active = self.introspection_active
        logits_adv = self.student_logits(ctx, ctx.x_adv)
        teacher_on = "clean" if cfg.variant == "I" else "adv"
        kl_t = kl_per_sample(logits_adv, ctx.teacher_probs("robust", teacher_on, temperature=tau), temperature=tau)
        # The student's clean pass: needed for the CE (IAD-I), the introspection target, or BN statistics.
        ce_weight = 1.0 - self.alpha - self.natural_weight
        logits_nat = clean_pass(
            ctx.student,
            ctx.x,
            needed=active or (cfg.variant == "I" and ce_weight > 0.0),
            forward_when_unused=self.clean_forward_when_unused,
        )
        parts = self.introspect(
            ctx, kl_t, logits_adv, logits_nat, weight_teacher_term=self.weight_teacher_term, reduction=red
        )
        kl_teacher, kl_intro = parts.teacher, parts.introspection
        terms: dict[str, Tensor] = {}
        if cfg.variant == "I":
            ce_nat = F.cross_entropy(logits_nat, ctx.y) if ce_weight > 0.0 and logits_nat is not None else None
            total = iad1_objective(kl_teacher, kl_intro, ce_nat, alpha=self.alpha, ce_weight=ce_weight, temperature=tau)
        else:
            kl_natural = reduce_kl(
                kl_per_sample(logits_adv, ctx.teacher_probs("natural", "adv", temperature=tau), temperature=tau),
                red,
                logits_adv.shape[1],
            )
            ce_adv = F.cross_entropy(logits_adv, ctx.y)
            total = iad2_objective(
                kl_teacher,
                kl_intro,
                kl_natural,
                ce_adv,
                alpha=self.alpha,
                natural_weight=self.natural_weight,
                ce_weight=ce_weight,
                temperature=tau,
            )
            terms["kl_natural"] = kl_natural.detach()
            terms["ce_adv"] = ce_adv.detach()
        parts.log_terms(terms, logits_nat=logits_nat, y=ctx.y)
        return LossOutput(total=total, terms=terms)


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(IAD)
