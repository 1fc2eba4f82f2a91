"""``iad``: Introspective Adversarial Distillation (Zhu et al., ICLR 2022), variants IAD-I and IAD-II."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.distiller import ATTACK_INITS, STUDENT_MODES, AttackSpec, Distiller, LossOutput
from robustbench_kd.errors import UserError, check_choice
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.methods.losses import KL_REDUCTIONS, kl_logits_per_sample, kl_per_sample, reduce_kl

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar
    from robustbench_kd.threat import ThreatSpec

VARIANTS = ("I", "II")

#: Reference defaults per variant (ZFancy/IAD ``IAD-I.py`` / ``IAD-II.py`` argparse; methods.md §5.1, §5.2).
VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "I": {"alpha": 1.0, "natural_weight": 0.0, "begin": 60, "weight_teacher_term": False,
          "clean_forward_when_unused": True},
    "II": {"alpha": 0.5, "natural_weight": 0.25, "begin": 40, "weight_teacher_term": True,
           "clean_forward_when_unused": False},
}


def reliability_weights(teacher_logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """IAD's per-sample trust in the teacher: ``w_b = p_T(y_b | x'_b) ** beta``, detached, shape ``[B]``.

    Computed as ``exp(beta * log_softmax(z_T)_y)`` (the same number as ``softmax(z_T)_y ** beta``,
    without underflow to 0 for a very confident wrong teacher). Temperature 1, as the reference.
    """
    log_p = F.log_softmax(teacher_logits_adv.detach(), dim=1).gather(1, y.view(-1, 1)).squeeze(1)
    return torch.exp(beta * log_p)


def introspection_kl(logits_adv: Tensor, logits_nat: Tensor, *, detach_target: bool) -> Tensor:
    """The self-distillation KL(p_S(x) || p_S(x')) per sample (tau = 1; "KL(S(x'), S(x))" in the paper).

    The reference does not detach p_S(x): gradients reach the clean branch too unless ``detach_target``.
    """
    target = logits_nat.detach() if detach_target else logits_nat
    return kl_logits_per_sample(logits_adv, target)


class IAD(Distiller):
    r"""IAD: trust the teacher per sample by its confidence in the true label at x', else introspect.

    Paper: Zhu, Yao, Han, Zhang, Liu, Niu, Zhou, Xu, Yang, 'Reliable Adversarial Distillation with
    Unreliable Teachers', ICLR 2022 [https://arxiv.org/abs/2106.04928]. Reference code: ZFancy/IAD
    (``IAD-I.py``, ``IAD-II.py``); methods.md §5, §5.1, §5.2, §13.4.

    Reliability weight (both variants), from the ``robust`` teacher on the student's x' (no grad)::

        w_b = softmax(z_T(x'_b))_{y_b} ** beta                      (beta = 0.1, tau = 1)

    Per-sample weights multiply the per-sample KLs BEFORE the batch reduction R (``kl_reduction``;
    reference: batchmean = (1/B) sum_b). KL(q || p) = sum_c q_c (log q_c - log p_c); p^tau = softmax(z/tau).
    "intro" is the introspection term KL_b(p_S(x_b) || p_S(x'_b)) at tau = 1, with p_S(x) NOT detached
    (reference; ``detach_self_target`` flag). W_b = w_b if ``weight_teacher_term`` else 1.

    IAD-I (``variant="I"``, built on ARD; methods.md §5.1), for epoch >= begin::

        L = a tau^2 R( W_b KL(p_T^tau(x_b) || p_S^tau(x'_b)) ) + a R( (1 - w_b) intro_b ) + (1 - a) CE(z_S(x), y)

    The teacher target is on the CLEAN x (memoised, no grad); the CE is on the student's clean output.

    IAD-II (``variant="II"``, built on AKD2 of Chen et al. 2021: ``robust`` = adversarially trained
    teacher T, ``natural`` = standard-trained teacher N; methods.md §5.2), for epoch >= begin::

        L = (1 - a - a2) CE(z_S(x'), y)
            + a tau^2 [ R( W_b KL(p_T^tau(x'_b) || p_S^tau(x'_b)) ) + R( (1 - w_b) intro_b ) ]
            + a2 tau^2 R( KL(p_N^tau(x'_b) || p_S^tau(x'_b)) )

    Both teachers are evaluated at x' (memoised, no grad); the CE is on the student's ADVERSARIAL
    output. (The introspection term carries a tau^2 here but not in IAD-I, as in the reference; with
    the default tau = 1 this makes no difference.)

    Warm-up (both variants): for epoch < begin, w is not used (W_b = 1) and the introspection term is
    absent, i.e. IAD-I is ARD with batchmean and IAD-II is AKD2. The switch is driven by
    :meth:`on_epoch_start` (0-based epochs, as ``epoch >= args.begin`` in the reference).

    Attack (both variants, the ARD attack module)::

        x' = PGD_{eps, alpha, K}( CE(z_S(x'), y) ),  uniform start U(-eps, eps), student in TRAIN mode

    Budget: the run's threat (reference: 8/255, 2/255, 10). Forward order as the reference:
    student(x') then student(x), both in train mode, separate passes; the teacher once on x (IAD-I)
    and once on x'. The reference's duplicated student(x) passes are not replicated (one pass gives
    the CE and the introspection target).

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
            reference per variant: False for IAD-I (all commits of ``IAD-I.py``), True for IAD-II
            (``IAD-II.py``; also the paper's formula). (Default: None.)
        detach_self_target (bool): stop the gradient through p_S(x) in the introspection KL.
            (Default: False, code.)
        kl_reduction (str): ``"batchmean"``, ``"mean_all"`` or ``"sum"``. (Default: "batchmean", code.)
        init (str): attack start. (Default: "uniform", code.)
        attack_student_mode (str): student BN mode in the attack. (Default: "train", code.)
        clean_forward_when_unused (bool | None): when the student's clean output is not needed (before
            the warm-up with CE weight 0), still run student(x) in train mode without grad so BN
            running statistics see the clean batch; None = reference per variant: True for IAD-I
            (``basic_net(inputs)`` runs every batch), False for IAD-II. (Default: None.)

    Teacher roles:
        robust: the adversarially trained teacher (reference: early-stopped PGD-AT ResNet-18).
        natural: IAD-II only, the standard-trained teacher (reference: WRN-34-10 ``ST.py``).

    Terms logged:
        ``kl_teacher`` (R of the (weighted) robust-teacher KL, before a and tau^2), ``kl_intro``
        (R of (1 - w) intro; after the warm-up), ``w_mean`` (batch mean of w; after the warm-up),
        ``kl_natural`` and ``ce_adv`` (IAD-II), ``ce_nat`` (clean CE, whenever the clean pass runs).

    Deviations / notes:
        * w is vectorised (the reference loops over samples with ``.item()``); same values.
        * The reference IAD-I runs an unused extra student(x') forward ("basicop" in some commits),
          which adds a BN running-statistics update; not replicated.

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
    class Config:
        """Hyper-parameters of IAD (see the class docstring for meanings and provenance)."""

        variant: str = "I"
        temperature: float = 1.0
        alpha: float | None = None
        natural_weight: float | None = None
        beta: float = 0.1
        begin: int | None = None
        weight_teacher_term: bool | None = None
        detach_self_target: bool = False
        kl_reduction: str = "batchmean"
        init: str = "uniform"
        attack_student_mode: str = "train"
        clean_forward_when_unused: bool | None = None

        def __post_init__(self) -> None:
            check_choice("variant", self.variant, VARIANTS)
            if not self.temperature > 0.0:
                raise UserError(f"method.temperature must be positive, got {self.temperature}")
            if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
                raise UserError(f"method.alpha must be in [0, 1] or None, got {self.alpha}")
            if self.natural_weight is not None:
                if self.variant == "I" and self.natural_weight != 0.0:
                    raise UserError("method.natural_weight is an IAD-II option (natural teacher); "
                                    "set method.variant = \"II\" or remove it")
                if not 0.0 <= self.natural_weight <= 1.0:
                    raise UserError(f"method.natural_weight must be in [0, 1] or None, got {self.natural_weight}")
            a, a2 = self.resolved("alpha"), self.resolved("natural_weight")
            if a + a2 > 1.0 + 1e-12:
                raise UserError(f"method.alpha + method.natural_weight must not exceed 1 (the CE weight is "
                                f"1 - alpha - natural_weight), got {a} + {a2}")
            if not self.beta >= 0.0:
                raise UserError(f"method.beta must be >= 0, got {self.beta}")
            if self.begin is not None and (isinstance(self.begin, bool) or not isinstance(self.begin, int)
                                           or self.begin < 0):
                raise UserError(f"method.begin must be a non-negative integer epoch or None, got {self.begin!r}")
            check_choice("kl_reduction", self.kl_reduction, KL_REDUCTIONS)
            check_choice("init", self.init, ATTACK_INITS)
            check_choice("attack_student_mode", self.attack_student_mode, STUDENT_MODES)

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
        self.teacher_roles = ("robust", "natural") if cfg.variant == "II" else ("robust",)
        self.optional_teacher_roles = ()
        self._epoch = 0

    # -- warm-up -----------------------------------------------------------------------------
    @property
    def introspection_active(self) -> bool:
        """Whether the current epoch (set by :meth:`on_epoch_start`) is past the warm-up."""
        return self._epoch >= self.begin

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        self._epoch = int(epoch)

    def method_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch}

    def load_method_state(self, state: Mapping[str, Any]) -> None:
        self._epoch = int(state.get("epoch", 0))

    # -- attack ------------------------------------------------------------------------------
    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        return AttackSpec(eps=threat.eps, alpha=threat.alpha, steps=threat.steps, norm=threat.norm,
                          init=self.config.init, student_mode=self.config.attack_student_mode)

    def attack_loss(self, ctx: BatchContext, x_adv: Tensor) -> Tensor:
        return F.cross_entropy(self.student_logits(ctx, x_adv), ctx.y, reduction="none")

    # -- loss --------------------------------------------------------------------------------
    def weights(self, ctx: BatchContext) -> Tensor:
        """w_b from the memoised robust teacher on x' (see :func:`reliability_weights`)."""
        return reliability_weights(ctx.teacher_logits("robust", "adv"), ctx.y, self.config.beta)

    def loss(self, ctx: BatchContext) -> LossOutput:
        cfg = self.config
        tau, red = cfg.temperature, cfg.kl_reduction
        active = self.introspection_active
        logits_adv = self.student_logits(ctx, ctx.x_adv)
        c = logits_adv.shape[1]
        terms: dict[str, Tensor] = {}

        teacher_on = "clean" if cfg.variant == "I" else "adv"
        kl_t = kl_per_sample(logits_adv, ctx.teacher_probs("robust", teacher_on, temperature=tau), temperature=tau)

        # The student's clean pass: needed for the CE (IAD-I), the introspection target, or BN statistics.
        ce_weight = 1.0 - self.alpha - self.natural_weight
        needs_nat = active or (cfg.variant == "I" and ce_weight > 0.0)
        logits_nat: Tensor | None = None
        if needs_nat:
            logits_nat = self.student_logits(ctx, ctx.x)
        elif self.clean_forward_when_unused:
            with torch.no_grad():
                logits_nat = self.student_logits(ctx, ctx.x)

        kl_intro: Tensor | None = None
        if active and logits_nat is not None:
            w = self.weights(ctx)
            kl_teacher = reduce_kl((w * kl_t) if self.weight_teacher_term else kl_t, red, c)
            intro = introspection_kl(logits_adv, logits_nat, detach_target=cfg.detach_self_target)
            kl_intro = reduce_kl((1.0 - w) * intro, red, c)
            terms["w_mean"] = w.mean()
        else:
            kl_teacher = reduce_kl(kl_t, red, c)

        if cfg.variant == "I":
            # The reference scales the introspection term by a only (no tau^2).
            total = self.alpha * tau * tau * kl_teacher
            if kl_intro is not None:
                total = total + self.alpha * kl_intro
            if ce_weight > 0.0 and logits_nat is not None:  # always set then (needs_nat)
                total = total + ce_weight * F.cross_entropy(logits_nat, ctx.y)
        else:
            kl_natural = reduce_kl(
                kl_per_sample(logits_adv, ctx.teacher_probs("natural", "adv", temperature=tau), temperature=tau),
                red, c)
            teacher_part = kl_teacher if kl_intro is None else kl_teacher + kl_intro
            total = self.alpha * tau * tau * teacher_part + self.natural_weight * tau * tau * kl_natural
            ce_adv = F.cross_entropy(logits_adv, ctx.y)
            if ce_weight > 0.0:
                total = total + ce_weight * ce_adv
            terms["kl_natural"] = kl_natural.detach()
            terms["ce_adv"] = ce_adv.detach()

        terms["kl_teacher"] = kl_teacher.detach()
        if kl_intro is not None:
            terms["kl_intro"] = kl_intro.detach()
        if logits_nat is not None:
            terms["ce_nat"] = F.cross_entropy(logits_nat.detach(), ctx.y)
        return LossOutput(total=total, terms=terms)


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(IAD)
