r"""``rslad``: Robust Soft Label Adversarial Distillation (Zi et al., ICCV 2021), with label mixing.

Paper: Zi, Zhao, Ma, Jiang, 'Revisiting Adversarial Robustness Distillation: Robust Soft Labels
Make Student Better', ICCV 2021 [https://arxiv.org/abs/2108.07969]. Reference code:
zibojia/RSLAD (``rslad_loss.py``, ``resnet18_rslad_cifar{10,100}.py``). Label mixing: Maroto et
al., 'On the benefits of knowledge distillation for adversarial robustness' (the AKD paper,
arXiv:2203.07159), Appendix A.2, which mixes the one-hot label into RSLAD's target.

Loss::

    q = a * p_T(x) + (1 - a) * onehot(y)                       (a = label_mix_alpha; q = p_T(x) at a = 1)
    L = s * [ lam * R( KL(q || p_S(x')) ) + (1 - lam) * R( KL(q || p_S(x)) ) ]

lam = ``adv_weight`` (5/6, so 1/6 on the natural term), tau = 1, no hard-label term. p_T(x) is the
memoised teacher on the CLEAN batch (no grad). R is ``kl_reduction``: the reference takes the
element-wise KL and ``torch.mean`` over B*C (``mean_all``). s = ``kl_scale``; the reference
CIFAR-100 script multiplies every KL by 10 "to keep consistent with CIFAR-10", so by default
s = 10 when ``num_classes == 100`` with ``mean_all`` and 1 otherwise. KL uses xlogy (0 log 0 = 0),
so label-mixed targets with exact zeros are fine. Forward order as the reference: student(x') then
student(x), both in train mode, separate passes.

Attack::

    x' = PGD_{eps, alpha, K}( KL(p_T(x) || p_S(x')) ),  x'_0 = x + 0.001 N(0, I), student in eval mode

The attack target is the UNMIXED clean-teacher distribution: the AKD paper only changes the training
loss, and leaving the attack as RSLAD's is our reading of it; ``mix_in_attack=True`` attacks q
instead. Budget: the run's threat (reference: 8/255, 2/255, 10).

IKL instead of KL (``divergence="ikl"``, our extension; :class:`robustbench_kd.methods.divergence.Divergence`):
each KL(q || p_S(.)) above becomes, per sample,

    ikl_mse_weight * (1/4) sum_{j,k} w_y^{jk} (Dt_jk - Ds_jk)^2 + ikl_sce_weight * ( -sum_j q_j log p_S(.)_j )

(q the possibly label-mixed target of the sCE; the wMSE always matches the unmixed teacher logits)
with Dt_jk = z_T(x)^j - z_T(x)^k (teacher on the clean batch, detached), Ds_jk the same differences of
the student's logits on x' (resp. x), which receive the wMSE gradient (IKL's "broken asymmetry":
in plain KL the student gets none of it). w_y = s_bar_y s_bar_y^T with s_bar_y the mean of the
teacher's clean ``softmax(z_T/ikl_prior_temperature)`` over class y in the previous epoch (uniform
1/C in the first epoch; accumulated in ``after_step``, finalised in ``on_epoch_end``, saved
in the checkpoint as buffers ``prior.*``); ``ikl_class_prior=False`` uses per-sample teacher weights
instead. The sCE has KL's gradient, so ``ikl_mse_weight=0`` trains exactly like ``divergence="kl"``.
Reductions, s and lam apply as for the KL. The attack keeps the KL: its input gradient equals that
of IKL-AT's sCE-only attack (the teacher side is constant).

Deviations / notes:
    * The reference writes the element-wise KL as ``-log p_S * p_T + log(p_T + 1e-5) * p_T``; the
      1e-5 shifts the logged value but not the gradient. We compute the exact KL.
    * The reference CIFAR-100 script uses ``log(softmax)`` for the student; we use log_softmax.

The module reads top-down: this description, the pure loss :func:`rslad_loss`, then the distiller
:class:`RSLAD` that gathers its tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from robustbench_kd.distiller import AttackSpec, LossOutput, option
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.methods.attack_options import student_mode_option, threat_attack
from robustbench_kd.methods.divergence import DivergenceDistiller, DivergenceOptions
from robustbench_kd.methods.losses import (
    kl_per_sample,
    kl_reduction_option,
    kl_scale_option,
    mix_with_labels,
    reduce_kl,
    reference_kl_scale,
)

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar
    from robustbench_kd.threat import ThreatSpec


def rslad_loss(
    divergence_adv: Tensor,
    divergence_nat: Tensor,
    *,
    adv_weight: float,
    reduction: str,
    scale: float,
    num_classes: int,
    name: str = "kl",
) -> LossOutput:
    """``s * [lam * R(d_adv) + (1 - lam) * R(d_nat)]`` from per-sample divergences ``[B]`` to the target q.

    ``d_adv`` / ``d_nat`` are the student's KL (or IKL) on x' / x; R is :func:`reduce_kl` with ``reduction``
    over ``num_classes``; the terms ``<name>_adv`` / ``<name>_nat`` are the scaled reductions.
    """
    adv = scale * reduce_kl(divergence_adv, reduction, num_classes)
    nat = scale * reduce_kl(divergence_nat, reduction, num_classes)
    total = adv_weight * adv + (1.0 - adv_weight) * nat
    return LossOutput(total=total, terms={f"{name}_adv": adv.detach(), f"{name}_nat": nat.detach()})


class RSLAD(DivergenceDistiller):
    r"""RSLAD: the clean-teacher soft label is the target of both the attack and the training loss.

    The method (paper, loss, attack, IKL variant, deviations) is described in the module docstring.

    Arguments (``RSLAD.Config``):
        adv_weight (float): lam, weight of the adversarial term, in [0, 1]. (Default: 5/6, code.)
        kl_reduction (str): ``"mean_all"``, ``"batchmean"`` or ``"sum"``. (Default: "mean_all", code.)
        kl_scale (float | None): s; None = reference default (10 for 100 classes with mean_all, else 1).
            (Default: None.)
        label_mix_alpha (float): a, in [0, 1]; 1 = original RSLAD. (Default: 1.0; the AKD paper finds
            a ~ 0.5 the best clean/robust trade-off for RSLAD, Fig. S2.)
        mix_in_attack (bool): attack q instead of p_T(x). (Default: False.)
        attack_student_mode (str): student BN mode in the attack. (Default: "eval", code.)
        divergence (str): ``"kl"`` (RSLAD) or ``"ikl"`` (module docstring). (Default: "kl".)
        ikl_mse_weight (float): wMSE weight (paper alpha, IKL code ``beta``). (Default: 5.0, our choice:
            the IKL-AT scripts' wMSE:sCE ratio 20:4 with the sCE kept at KL's scale.)
        ikl_sce_weight (float): sCE weight (paper beta, IKL code ``alpha``). (Default: 1.0.)
        ikl_prior_temperature (float): T of the teacher softmax behind the class prior. (Default: 4.0,
            IKL-AT scripts ``--T 4``.)
        ikl_class_prior (bool): class-wise weights (IKL ``GI``); False = per-sample teacher weights.
            (Default: True.)

    Teacher roles:
        robust: the robust teacher (reference: TRADES WRN-34-10 on CIFAR-10, Gowal2020Uncovering
        WRN-70-16 on CIFAR-100).

    Terms logged:
        ``kl_adv``, ``kl_nat``: the reduced KLs (scale s included, weights not); ``ikl_adv``, ``ikl_nat``
        instead with ``divergence="ikl"``.

    Examples::

        >>> rslad = RSLAD(num_classes=10)                       # 5/6 adv + 1/6 nat, mean_all
        >>> rslad_lm = RSLAD(RSLAD.Config(label_mix_alpha=0.5))   # AKD paper's label-mixed RSLAD
        >>> rslad_ikl = RSLAD(RSLAD.Config(divergence="ikl"))      # IKL replaces both KLs
        >>> # run config: [method] name = "rslad", label_mix_alpha = 0.5
    """

    name: ClassVar[str] = "rslad"
    supports_distributed: ClassVar[bool] = True  # IKL class prior: summed over processes
    paper: ClassVar[str] = (
        "Bojia Zi, Shihao Zhao, Xingjun Ma, Yu-Gang Jiang. Revisiting Adversarial Robustness Distillation: "
        "Robust Soft Labels Make Student Better. ICCV 2021. arXiv:2108.07969"
    )
    teacher_roles: ClassVar[tuple[str, ...]] = ("robust",)

    @dataclass(frozen=True, kw_only=True)
    class Config(DivergenceOptions):
        """Hyper-parameters of RSLAD (see the class docstring for meanings and provenance)."""

        adv_weight: float = option(5.0 / 6.0, low=0, high=1, help="lam, weight of the adversarial KL term")
        kl_reduction: str = kl_reduction_option("mean_all")
        kl_scale: float | None = kl_scale_option()
        label_mix_alpha: float = option(
            1.0, low=0, high=1, help="a, teacher weight of the label-mixed target; 1 = original RSLAD"
        )
        mix_in_attack: bool = option(False, choices=(False, True), help="attack the label-mixed target q")
        attack_student_mode: str = student_mode_option("eval")

    @property
    def kl_scale(self) -> float:
        """The effective KL multiplier s (resolves ``Config.kl_scale=None`` to the reference default)."""
        return reference_kl_scale(self.config.kl_scale, self.num_classes, self.config.kl_reduction)

    def target(self, ctx: BatchContext) -> Tensor:
        """The training target q (label-mixed clean-teacher probabilities)."""
        probs = ctx.teacher_probs("robust", "clean")
        if self.config.label_mix_alpha == 1.0:
            return probs
        return mix_with_labels(probs, ctx.y, self.config.label_mix_alpha)

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        return threat_attack(threat, self.config, init="gauss")

    def attack_loss(self, ctx: BatchContext, x_adv: Tensor) -> Tensor:
        target = self.target(ctx) if self.config.mix_in_attack else ctx.teacher_probs("robust", "clean")
        return kl_per_sample(self.student_logits(ctx, x_adv), target)

    def loss(self, ctx: BatchContext) -> LossOutput:
        cfg = self.config
        q = self.target(ctx)
        logits_adv = self.student_logits(ctx, ctx.x_adv)
        logits_nat = self.student_logits(ctx, ctx.x)
        teacher_logits = ctx.teacher_logits("robust", "clean")

        def divergence(student_logits: Tensor) -> Tensor:
            return self.divergence.per_sample(student_logits, q, teacher_logits=teacher_logits, labels=ctx.y)

        return rslad_loss(
            divergence(logits_adv),
            divergence(logits_nat),
            adv_weight=cfg.adv_weight,
            reduction=cfg.kl_reduction,
            scale=self.kl_scale,
            num_classes=logits_adv.shape[1],
            name=cfg.divergence,
        )


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(RSLAD)
